"""Where weights and KV pages live, and how the model runs across devices. Knows nothing of jserve.

mesh.py        the (data, stage, tensor) device mesh; tensor groups inside a host
rules.py       logical axes -> mesh axes for every parameter and the KV pool; placement
tensor.py      attention per device on its own heads (shard_map)
pipeline.py    layers split into stages on sub-meshes, micro-batches in flight
replicas.py    data-parallel replicas and the router in front of them
distributed.py multi-host: jax.distributed, leader broadcast
checkpoint.py  orbax copies restored straight into each host's shards
costs.py       the roofline cost model and device presets
planner.py     ranked (data, stage, tensor) plans: what `jserve plan` prints
"""
