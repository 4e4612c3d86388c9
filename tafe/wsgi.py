"""``tafe.wsgi:application``: the same bid logic for any WSGI server (gunicorn, uWSGI, bjoern, mod_wsgi).

Settings come from ``TAFE_*`` environment variables (and ``TAFE_CONFIG``), exactly as
for ``tafe serve``; the app is built once, at import, in each worker that imports it.
Such servers do not set ``tafe.arrival``, so deadlines count from when the app is called.
"""

from __future__ import annotations

from tafe import settings as _settings
from tafe.handlers import build

apps = build(_settings.load())
application = apps.public
