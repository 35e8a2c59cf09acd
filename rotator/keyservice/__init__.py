"""Key-service adapters: the HTTP contract of docs/keyservice-api.md (`http`, over `transport`), its
emulator, AWS IAM, and any a plugin registers (`registry`). `rotator.runtime.build_keyservice`
builds the one a configuration names. Nothing here imports the configuration: it validates `kind`
against the registry.
"""
