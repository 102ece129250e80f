"""The one place that assembles the layers: the `ddpo` CLI (`cli`), the training driver (`driver`), process wiring
(`infra`: Ray, Redis, spawned reward servers) and the other commands (`sample`, `evaluate`). Nothing in the core
(`services.*` outside this package), `actors`, `learner` or `reward_servers` imports it."""
