"""The main job (`make run`, `python -m services.stack job`): a client of the running stack, not a
service. It talks to the services only through their public contracts (the Router and Pool
APIs, the generated-text topic, the warm-answers file) and imports no service package."""
