"""The pure core: workflow definitions and plans, expressions, durations, the engine and its
state, and the balancer. Nothing here performs I/O or imports faststream, aiokafka or redis
(`tests/test_layering.py` checks it), so all of it is unit-testable and deterministic."""
