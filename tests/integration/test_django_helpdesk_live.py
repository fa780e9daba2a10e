"""Against a real django-helpdesk 2.6 (own virtualenv, SQLite, `manage.py runserver` on
loopback) and a real `triage serve`: a ticket created through django-helpdesk's REST API
arrives by its webhook and is stored; triage's write-back sets queue, priority and a private
follow-up visible through its API; the follow-up webhook that note causes is ignored.

The classification step between the two is covered by the e2e suite; here the write-back is
applied to the stored ticket directly, so the test needs no classifier backend.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from tests.support.stack import make_runtime, stack_env, truncate, wait_until
from triage.config import PROJECT_ROOT
from triage.db.models import OutboxMessage, Ticket
from triage.sinks.base import Delivery
from triage.sinks.django_helpdesk import DjangoHelpdeskWriter

pytestmark = pytest.mark.slow

TOKEN = "live-dh-token-0123456789"
ADMIN = ("triage", "triage-pw")

SETTINGS = """
import os
BASE = os.path.dirname(os.path.abspath(__file__))
SECRET_KEY = "triage-test-only"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "dhurls"
SITE_ID = 1
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
HELPDESK_TEAMS_MODE_ENABLED = False
INSTALLED_APPS = [
    "django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions",
    "django.contrib.sites", "django.contrib.admin", "django.contrib.humanize",
    "django.contrib.messages", "django.contrib.staticfiles", "rest_framework", "helpdesk",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3",
                         "NAME": os.path.join(BASE, "db.sqlite3")}}
STATIC_URL = "/static/"
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
REST_FRAMEWORK = {"DEFAULT_AUTHENTICATION_CLASSES": [
    "rest_framework.authentication.BasicAuthentication"]}
"""
URLS = (
    "from django.urls import include, path\n"
    'urlpatterns = [path("", include("helpdesk.urls", namespace="helpdesk"))]\n'
)
MANAGE = (
    "import os, sys\n"
    'os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dhsite")\n'
    "from django.core.management import execute_from_command_line\n"
    "execute_from_command_line(sys.argv)\n"
)
SETUP = f"""
from django.contrib.auth.models import User
from helpdesk.models import Queue
User.objects.create_superuser("{ADMIN[0]}", "triage@example.com", "{ADMIN[1]}")
for slug in ["billing", "support", "accounts", "general"]:
    Queue.objects.create(title=slug.title(), slug=slug)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def helpdesk_site(tmp_path_factory) -> Path:
    """django-helpdesk 2.6 installed in its own virtualenv, migrated, with a staff user and
    four queues."""
    root = tmp_path_factory.mktemp("django-helpdesk")
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "django-helpdesk>=2.6,<2.7"],
        check=True,
        timeout=600,
    )
    site = root / "site"
    site.mkdir()
    (site / "dhsite.py").write_text(SETTINGS)
    (site / "dhurls.py").write_text(URLS)
    (site / "manage.py").write_text(MANAGE)
    subprocess.run([python, "manage.py", "migrate", "-v0"], cwd=site, check=True, timeout=300)
    subprocess.run([python, "manage.py", "shell", "-c", SETUP], cwd=site, check=True, timeout=60)
    return site


@pytest.fixture()
def triage_api(pg_url, clean_redis) -> Iterator[tuple[str, dict[str, str]]]:
    truncate(pg_url)
    env = stack_env(pg_url, clean_redis, TRIAGE_WEBHOOK_SECRET_DJANGO_HELPDESK=TOKEN)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "triage.cli.main", "serve", "--port", str(port)],
        env=env,
        cwd=PROJECT_ROOT,
    )
    try:
        wait_until(lambda: listening(port), 30, what="triage serve")
        yield f"http://127.0.0.1:{port}", env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture()
def helpdesk(helpdesk_site, triage_api) -> Iterator[str]:
    api_url, env = triage_api
    hook = f"{api_url}/webhooks/django-helpdesk/{TOKEN}"
    port = free_port()
    dh_env = {
        "PATH": env.get("PATH", "/usr/bin:/bin"),
        "HELPDESK_NEW_TICKET_WEBHOOK_URLS": hook,
        "HELPDESK_FOLLOWUP_WEBHOOK_URLS": hook,
    }
    python = helpdesk_site.parent / "venv" / "bin" / "python"
    proc = subprocess.Popen(
        [python, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
        cwd=helpdesk_site,
        env=dh_env,
    )
    try:
        wait_until(lambda: listening(port), 60, what="django-helpdesk runserver")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_real_django_helpdesk_ticket_arrives_and_write_back_is_visible(
    helpdesk, triage_api, pg_url, clean_redis
):
    rt = make_runtime(triage_api[1])
    dh = httpx.Client(base_url=helpdesk, auth=ADMIN, timeout=30)
    queues = {"billing": 1, "support": 2, "accounts": 3, "general": 4}

    created = dh.post(
        "/api/tickets/",
        json={
            "queue": queues["general"],
            "title": "Charged twice",
            "description": "I was charged twice for my subscription this month.",
            "submitter_email": "jane.doe@example.com",
            "priority": 3,
        },
    )
    assert created.status_code == 201, created.text
    external_id = str(created.json()["id"])

    # django-helpdesk posted its webhook synchronously while creating the ticket.
    with rt.sessions() as s:
        ticket = s.scalars(
            select(Ticket).where(
                Ticket.source == "django-helpdesk", Ticket.external_id == external_id
            )
        ).one()
        assert ticket.subject == "Charged twice"
        assert ticket.requester_email == "jane.doe@example.com"
        assert ticket.extra["queue_slug"] == "general"
        ticket_id = ticket.id

    writer = DjangoHelpdeskWriter(
        helpdesk,
        username=ADMIN[0],
        password=ADMIN[1],
        queues={},
        queue_ids=queues,
        timeout_seconds=10,
    )
    delivery = Delivery(
        ticket_id=ticket_id,
        dispatch_id=1,
        source="django-helpdesk",
        external_id=external_id,
        route="dept.billing",
        department="billing",
        needs_review=False,
        review_reason=None,
        label={"intent": "billing", "priority": "urgent", "confidence": 0.9, "summary": "x"},
        metadata={},
    )
    writer.deliver(delivery)
    writer.deliver(delivery)  # a retried delivery writes the note once

    after = dh.get(f"/api/tickets/{external_id}/").json()
    assert after["queue"] == queues["billing"] and after["priority"] == 1
    notes = [f for f in after["followup_set"] if (f["title"] or "").startswith("[triage]")]
    assert len(notes) == 1 and notes[0]["public"] is False
    assert "intent billing" in notes[0]["comment"]

    # The follow-up webhook our note caused reached triage and was ignored: two deliveries
    # answered 202 (the new ticket and the note), nothing new stored or enqueued.
    metrics = httpx.get(f"{triage_api[0]}/metrics").text
    assert 'triage_webhooks_total{source="django-helpdesk",status="202"} 2.0' in metrics
    with rt.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Ticket)) == 1
        assert s.scalar(select(func.count()).select_from(OutboxMessage)) == 1
        assert s.get(Ticket, ticket_id).generation == 0
