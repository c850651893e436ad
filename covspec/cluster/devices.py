"""Device drafters as Ray actors: each wraps the same ``Device`` as the in-process engine.

A ``DeviceWorker`` loads the draft VLM once, holds its own emulated link (``cluster.device_links[i]`` round robin,
else ``link``) and compute slow-down factor, and reaches the edge through a Ray Serve deployment handle via a
``ServeTransport``. It keeps one ``Device`` per method, so adaptive drafting's estimates (link, draft speed,
acceptance) carry over from one request to the next, as on a real phone. Actors reserve a fraction of a CPU
(``cluster.device_cpus``) and run ``cluster.device_threads`` torch threads.
"""

from __future__ import annotations

import io
import os
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Any

import ray

from covspec.config import Config, LinkConfig
from covspec.runtime.transport import LINK_SWITCH_INTERVAL_S


@dataclass(frozen=True)
class Job:
    """One sample for one method, as shipped to a device (plain data: an id, PNG bytes, text)."""

    method: str
    sample_id: str
    question: str
    image_png: bytes
    link_seed: int


def device_link(cfg: Config, index: int) -> LinkConfig:
    """The link (and slow-down) of device ``index``: ``cluster.device_links`` round robin, else ``link``."""
    links = cfg.cluster.device_links
    return links[index % len(links)] if links else cfg.link


class DeviceWorker:
    """One emulated device (see the module docstring). Methods are called by ``covspec.cluster.experiment``."""

    def __init__(self, cfg_yaml: str, index: int, app_name: str) -> None:
        import torch
        from ray import serve

        from covspec.cluster.edge_app import DEPLOYMENT_NAME
        from covspec.cluster.placement import pin_process
        from covspec.cluster.transport import ServeTransport
        from covspec.config import load_config_text
        from covspec.models.loading import load_adapter
        from covspec.protocol import Link
        from covspec.runtime.engine import link_profile_of

        self.cfg = load_config_text(cfg_yaml)
        self.index = index
        torch.set_num_threads(self.cfg.cluster.device_threads)
        # The actor's process is the device's own: replies from the edge arrive on threads that must not wait up to
        # the default 5 ms for the lock while the device drafts (covspec.runtime.transport.LINK_SWITCH_INTERVAL_S).
        sys.setswitchinterval(LINK_SWITCH_INTERVAL_S)
        if self.cfg.cluster.device_nice:
            os.nice(self.cfg.cluster.device_nice)
        self.cores = pin_process(self.cfg.cluster.device_cores, "cluster.device_cores")
        m = self.cfg.models.draft
        self.draft = load_adapter(m.path, m.dtype, m.device, key="models.draft.path")
        self.link_cfg = device_link(self.cfg, index)
        self.peer = f"device{index}-{secrets.token_hex(6)}"
        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=app_name)
        self.transport = ServeTransport(handle, Link(link_profile_of(self.link_cfg), seed=self.cfg.seed + index),
                                        self.peer, call_timeout_s=self.cfg.cluster.sample_timeout_s)  # fmt: skip
        self._devices: dict[str, Any] = {}

    def ping(self) -> dict[str, Any]:
        return {"index": self.index, "pid": os.getpid(), "peer": self.peer, "rtt_ms": self.link_cfg.rtt_ms,
                "compute_slowdown": self.link_cfg.compute_slowdown,
                "switch_interval_s": sys.getswitchinterval(), "nice": os.getpriority(os.PRIO_PROCESS, 0),
                "cores": self.cores}  # fmt: skip

    def _device(self, method: str):
        from covspec.pruning import build_pruner
        from covspec.runtime.device import Device
        from covspec.runtime.engine import device_settings, method_config

        if method not in self._devices:
            settings = device_settings(self.cfg, method)
            settings.compute_slowdown = self.link_cfg.compute_slowdown
            settings.reply_timeout_s = self.cfg.cluster.sample_timeout_s
            _, mcfg = method_config(self.cfg, method)
            pruner = build_pruner(mcfg.pruning, self.cfg.seed) if method != "target_only" else None
            self._devices[method] = Device(self.draft, self.transport, settings, pruner)
        return self._devices[method]

    def run(self, job: Job) -> dict[str, Any]:
        """Answer one sample with ``job.method``: its output and measurements (the run scores them)."""
        from PIL import Image

        from covspec.inputs import MAX_PROMPT_CHARS, check_question, question_token_limit
        from covspec.protocol import Link
        from covspec.runtime.engine import link_profile_of

        question = check_question(job.question, self.draft.tokenizer, question_token_limit(self.draft),
                                  max_chars=MAX_PROMPT_CHARS, keep_lines=True)  # fmt: skip
        device = self._device(job.method)
        # Each sample's link randomness (jitter, loss) is seeded by the sample, not by the device it lands on.
        self.transport.link = Link(link_profile_of(self.link_cfg), seed=job.link_seed)
        with Image.open(io.BytesIO(job.image_png)) as img:
            image = img.convert("RGB")
        started = time.time()
        result = device.run(image, question)
        row: dict[str, Any] = {"sample_id": job.sample_id, "method": job.method, "token_ids": result.token_ids,
                               "text": result.text, **result.metrics()}  # fmt: skip
        row.update({"device": self.index, "peer": self.peer, "started_at": started, "finished_at": time.time()})
        return row

    def crash(self) -> None:
        """Ends this actor's process (fault-injection tests only)."""
        os._exit(1)


DeviceActor = ray.remote(DeviceWorker)


def device_options(cfg: Config) -> dict[str, Any]:
    """Ray actor options of a device: fractional CPUs, one restart after a crash, no silent task retries."""
    return {"num_cpus": cfg.cluster.device_cpus, "num_gpus": cfg.cluster.device_gpus, "max_restarts": 1,
            "max_task_retries": 0,
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(cfg.cluster.device_threads)}}}  # fmt: skip
