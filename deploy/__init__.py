"""Operator tools that deploy the trainer outside the pipeline (the Cloud Run Job).

Nothing here imports torch or the step modules: it renders specs and shells out to gcloud.
"""
