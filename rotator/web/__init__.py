"""`rotator web`: a read-only status page of the fleet, its JSON, and nothing that changes anything.

Everything shown comes from `rotator.fleet` (the same report as `rotator status --json`); every
value is escaped by the templates and the page runs only its own static script under a strict CSP,
because ids and aliases come from the key service and are treated as hostile.
"""
