"""OpenAI-compatible server (needs `pip install 'leanlm[serve]'`): see app.py."""


def create_app(*args, **kwargs):
    from .app import create_app as _create

    return _create(*args, **kwargs)


def serve(*args, **kwargs):
    from .app import serve as _serve

    return _serve(*args, **kwargs)


__all__ = ["create_app", "serve"]
