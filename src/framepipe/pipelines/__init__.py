"""Ready-made job pipelines: the ML video pipeline (``ml_video``) and its model settings."""
