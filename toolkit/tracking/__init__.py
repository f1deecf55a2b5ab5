"""The MLflow edge, what is recorded: runs, params, metrics and artifacts, Tune trials' runs,
logged models (weights + JSON, no pickle), the split as dataset inputs, machine tags.
"""
