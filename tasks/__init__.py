"""Small typed functions grouped by concern; Prefect tasks are declared where they are defined."""
