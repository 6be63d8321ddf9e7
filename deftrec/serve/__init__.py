"""Ray Serve application: ``serve run deftrec.serve:app run_dir=DIR``."""

from deftrec.serve.app import app, build_app

__all__ = ["app", "build_app"]
