"""The team's tracking server and its access: PostgreSQL with a password (postgres), `mlflow server` behind
MLflow's basic-auth app (mlflow_server, auth), the command that serves both (serve), team members and
their permissions (members), and the credentials a client logs in with (credentials)."""
