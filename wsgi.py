"""gunicorn target: `gunicorn wsgi:app`."""

from manager import create_app

app = create_app()
