"""Running a stack on this machine: the local MLflow server, run state, up and down."""
