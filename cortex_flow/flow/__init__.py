"""The flow language: models, YAML source, loading, templates, checks, the pure plan.

Nothing in this layer talks to Redis or runs an event loop (import-linter checks that
it imports neither redis, asyncio nor aiohttp).
"""
