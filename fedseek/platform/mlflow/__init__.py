"""MLflow: run tracking (with its outbox), the Model Registry and plots."""
