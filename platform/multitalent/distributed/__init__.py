"""Distribution: the DeepSpeed configuration and engine, and the Ray Train launch.

Nothing here is imported by models, losses or data; they stay plain torch. Heavy imports (ray,
deepspeed) happen inside the functions that need them.

- ``deepspeed_config``: :func:`derive_deepspeed_config` (pure; every value derived once from the job).
- ``engine``: :func:`build_engine` (DeepSpeed engine on CPU/gloo or GPU/NCCL inside a Ray worker),
  :func:`full_state_dict` (consolidated weights under any ZeRO stage).
- ``ray_launch``: :func:`build_trainer` (Ray Train ``TorchTrainer`` from a job).
"""
