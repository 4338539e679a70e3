"""DVC stage entry points: each module reads params.yaml, calls the library, writes its outputs.

Run one with `python -m stages.NAME` (what dvc.yaml does) or `migm stage NAME`.
"""
