"""A deterministic simulation of mediator replicas, services and faults.

`world.World` runs the real runtime (engine, store scripts, outbox, breakers, registry,
router) of several replicas under a seeded scheduler that interleaves them and injects
redeliveries, duplicate and late replies, stalls past leases, operator controls and
deaths; `invariants` says what must hold afterwards. ``python -m tests.simulation``
runs seeds from the command line; a failing seed prints its history and replays exactly.
"""
