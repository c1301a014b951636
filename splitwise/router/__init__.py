"""The front-door router: the OpenAI API without an engine, dispatching through the Redis scheduler."""
