"""Celery's conventional config module: the same settings rotator reads from `$ROTATOR_CONFIG`.

`celery -A rotator.tasks worker --config celeryconfig` and `rotator worker` behave the same.
"""

from rotator.celeryconf import *  # noqa: F403
