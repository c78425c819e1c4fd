"""Thin adapters, one per service, built in one place (``clients``): ``s3`` (boto3),
``labelstudio`` (label-studio-sdk 2.x) and ``prefect`` (is the server scheduling?). An adapter
only talks to its service; what sftflow does with the answers lives in the stage folders."""
