"""Launch tooling: run profiles (``configs/``) and Ray job submission (``submit``)."""
