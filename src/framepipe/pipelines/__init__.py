"""Ready-made job pipelines built on framepipe's toolkit."""
