"""Distribution: the DeepSpeed configuration and engine, and the Ray Train launch.

Nothing here is imported by models, losses or data; they stay plain torch. Heavy imports (ray,
deepspeed) happen inside the functions that need them.

- ``deepspeed_config``: :func:`derive_deepspeed_config` (pure; every value derived once from
  :class:`DeepSpeedSettings`).
- ``engine``: :func:`build_engine` (DeepSpeed engine on CPU/gloo or GPU/NCCL inside a Ray worker),
  :func:`full_state_dict` (consolidated weights under any ZeRO stage).
- ``ray_launch``: :class:`WorkerGroup`, :func:`build_trainer` (Ray Train ``TorchTrainer``).

Everything here takes plain settings (:class:`DeepSpeedSettings`, :class:`WorkerGroup`), never the
training job: :mod:`multitalent.train.components` translates the job.
"""
