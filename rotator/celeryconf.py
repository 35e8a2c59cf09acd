"""Celery settings, read once from rotator's own configuration (`$ROTATOR_CONFIG`).

JSON only, late acknowledgement, a redelivery deadline longer than the longest rotation (Redis's
visibility_timeout, or RabbitMQ's consumer_timeout with publisher confirms and optional quorum
queues), one task prefetched per process. Task arguments are ids and trigger names; results are
`RotationResult` dicts: neither ever holds a secret.
"""

from __future__ import annotations

from rotator.config import load_settings
from rotator.safety import private_state_dir

_settings = load_settings()
_c = _settings.celery

broker_url = _c.broker()
result_backend = _c.backend()
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
task_track_started = True
result_expires = _c.result_expires_s
result_extended = False
broker_transport_options: dict[str, object]
if _c.broker_is_amqp():
    # RabbitMQ: a task held unacknowledged past the broker's consumer_timeout is redelivered (config.py
    # checks it against the longest rotation); Redis's visibility_timeout means nothing here. Every
    # publish (beat's fan-out, `rotate --enqueue`, retries, alerts) waits for the broker's confirm, so a
    # message the broker refused raises instead of vanishing.
    broker_transport_options = {"confirm_publish": True}
    if _c.quorum_queues:
        # A replicated queue. Quorum queues refuse global QoS (Celery detects them and uses a static
        # per-consumer prefetch) and a worker cannot raise its prefetch for a countdown, so retries go
        # through RabbitMQ's native delayed delivery, which needs a topic exchange, not a direct one.
        task_default_queue_type = "quorum"
        task_default_exchange_type = "topic"
        worker_detect_quorum_queues = True
        broker_native_delayed_delivery_queue_type = "quorum"
else:
    broker_transport_options = {"visibility_timeout": _c.visibility_timeout_s}
result_backend_transport_options = {"visibility_timeout": _c.visibility_timeout_s}
broker_connection_retry_on_startup = True
worker_hijack_root_logger = False
# No remote control: any client of the broker could otherwise broadcast `shutdown`, `pool_restart`,
# `revoke`, `rate_limit` or `autoscale` to every worker. `rotator health --worker` reads the
# worker's heartbeat in the state Redis instead (rotator.heartbeat).
worker_enable_remote_control = False
# Messages for no task of ours, or that do not decode, are refused like forged ones (rotator.gate).
worker_consumer = "rotator.gate:GatedConsumer"
# rotator's log lines go to stderr with their own level; redirected, every one would be logged again
# as a WARNING of `celery.redirected`.
worker_redirect_stdouts = False
worker_concurrency = _c.concurrency
task_default_queue = _c.queue
timezone = "UTC"
enable_utc = True
# Beat's schedule is a shelve (pickle): whoever can write it runs code in beat. It lives in a private
# directory (0700, $XDG_STATE_HOME/rotator or ~/.local/state/rotator), never the shared temp dir.
try:
    beat_schedule_filename = str(private_state_dir() / f"beat-schedule-{_settings.state.namespace}")
except OSError as _exc:  # only beat needs it: workers start anyway, and `rotator beat` says why it cannot
    beat_schedule_filename = ""
    beat_schedule_problem = f"{type(_exc).__name__}: {_exc}"
# Every beat runs rotator's scheduler: only the one holding the beat lease in the state Redis
# schedules (rotator.beat); the others wait as standbys and take over when it goes.
beat_scheduler = "rotator.beat:LeaderScheduler"
beat_schedule = {
    "scan": {"task": "rotator.scan", "schedule": float(_c.scan_every_s)},
    "recover": {"task": "rotator.recover", "schedule": float(_c.recover_every_s)},
    "reconcile": {"task": "rotator.reconcile", "schedule": float(_c.reconcile_every_s)},
    "warn_due_soon": {"task": "rotator.warn_due_soon", "schedule": float(_c.warn_every_s)},
}
if _c.repair_every_s and _settings.policy.mode == "enforce":
    # One not started within its interval is dropped: the next one is as good.
    beat_schedule["repair"] = {"task": "rotator.repair", "schedule": float(_c.repair_every_s),
                               "options": {"expires": float(_c.repair_every_s)}}
if _settings.view.publish_every_s:
    # One not started within its interval is dropped: the next one is as good.
    beat_schedule["publish_view"] = {"task": "rotator.publish_view", "schedule": float(_settings.view.publish_every_s),
                                     "options": {"expires": float(_settings.view.publish_every_s)}}
