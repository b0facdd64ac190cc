"""The Redis side: key builders, the store and its Lua scripts, the state cache, the stored
definitions and the connection factory."""
