"""The Ray runtime: block actors as Ray actors, on the cluster at --address or on a local Ray it starts. A
call names the actor's method by the method itself; only in `ray_calls` does its name become Ray's string.

Where the actors run is decided, not left to chance: they go into one placement group (one bundle per actor,
packed onto as few nodes as fit them), and ranks are given to bundles node by node, so that neighbouring
spans, which hand activations to each other, share a node wherever the cluster allows."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Concatenate, Iterator, ParamSpec, Sequence, TypeVar, cast

from wq_ops.cluster.ray_calls import RayPending, call_remote, ref_of
from wq_ops.cluster.runtime import ActorHandle, Pending
from wq_ops.config import JobConfig, RunConfig
from wq_ops.errors import ResourceError

if TYPE_CHECKING:
    from wq_ops.cluster.actor import BlockActor

__all__ = ["RayRuntime"]

# How long the actors' placement may wait for the cluster (an autoscaler may be starting nodes).
_PLACEMENT_TIMEOUT_S = 600

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class RayRuntime:
    name = "ray"

    def __init__(self) -> None:
        self._started = False
        self._group: Any = None
        self.placement: list[str] = []      # the node id each rank's actor was placed on

    def start(self, job: JobConfig) -> None:
        """Connect to the cluster at `address`, or start a local Ray."""
        import ray

        if ray.is_initialized():
            return
        run = job.run
        if run.address:
            ray.init(address=run.address, logging_level=logging.WARNING)
        else:
            # Exactly the CPUs the actors ask for: Ray starts idle workers for every logical CPU it is given,
            # and os.cpu_count() can be the whole host's count inside a container; the driver needs none.
            ray.init(num_cpus=run.all_actors * run.cpus_per_actor, include_dashboard=False,
                     logging_level=logging.WARNING)
        self._started = True

    def start_actors(self, job: JobConfig) -> list[ActorHandle]:
        """One warm actor per --actors, then one per --expert-actors: each starts its process, device and
        kernels while the driver reads the checkpoint's config and the calibration data."""
        import ray

        from wq_ops.cluster.actor import BlockActor
        from wq_ops.device.warm_up import job_needs_transformers, job_shapes

        self._check_resources(job.run)
        bundles = self._place(job.run)
        remote_actor: Any = ray.remote(BlockActor)
        shapes, preload = job_shapes(job), job_needs_transformers(job)
        return [ActorHandle(remote_actor.options(num_cpus=job.run.cpus_per_actor, num_gpus=job.run.gpus_per_actor,
                                                 max_restarts=0, scheduling_strategy=self._in_bundle(bundle))
                            .remote(job.run, job.quant.backend, shapes, preload_transformers=preload))
                for bundle in bundles]

    def _place(self, run: RunConfig) -> list[int]:
        """Reserve one bundle per actor (PACK: as few nodes as fit them) and return the bundle of each rank,
        node by node: ranks 0..k-1 on the first node, k.. on the next, so neighbouring spans share a node."""
        import ray
        from ray.util.placement_group import placement_group, placement_group_table

        bundle = {"CPU": float(run.cpus_per_actor)}
        if run.gpus_per_actor:
            bundle["GPU"] = float(run.gpus_per_actor)
        self._group = placement_group([bundle] * run.all_actors, strategy="PACK", name="wq-block-actors")
        ready, _ = ray.wait([self._group.ready()], timeout=_PLACEMENT_TIMEOUT_S)
        if not ready:
            raise ResourceError(f"{run.all_actors} actors of {bundle} could not be placed on the Ray cluster within "
                                f"{_PLACEMENT_TIMEOUT_S} s; lower --actors or their resources, or add nodes")
        nodes: dict[int, str] = placement_group_table(self._group)["bundles_to_node_id"]   # bundle -> node id
        node_order: dict[str, int] = {}
        for b in sorted(nodes):
            node_order.setdefault(nodes[b], len(node_order))         # nodes in the order of their first bundle
        order = sorted(nodes, key=lambda b: (node_order[nodes[b]], b))
        self.placement = [nodes[b] for b in order]
        return order

    def _in_bundle(self, bundle: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(placement_group=self._group, placement_group_bundle_index=bundle)

    @staticmethod
    def _check_resources(run: RunConfig) -> None:
        """Enough GPUs or CPUs in the cluster for every actor, else the actors would wait forever."""
        import ray

        resources = ray.cluster_resources()
        if run.gpus_per_actor > 0:
            need = run.all_actors * run.gpus_per_actor
            if resources.get("GPU", 0) < need:
                raise ResourceError(f"{run.all_actors} actors x {run.gpus_per_actor} GPU need {need:g} GPUs; the Ray "
                                    f"cluster has {resources.get('GPU', 0):g}")
            return
        need_cpus = run.all_actors * run.cpus_per_actor
        if resources.get("CPU", 0) < need_cpus:
            raise ResourceError(f"{run.all_actors} actors x {run.cpus_per_actor} CPUs need {need_cpus}; the Ray "
                                f"cluster has {resources.get('CPU', 0):g}")

    def put(self, value: T) -> T:
        import ray

        return cast(T, ray.put(value))

    def call(self, actor: ActorHandle, method: Callable[Concatenate["BlockActor", P], R], *args: P.args,
             **kwargs: P.kwargs) -> Pending[R]:
        return call_remote(actor, method, *args, **kwargs)

    def stream(self, actor: ActorHandle, method: Callable[Concatenate["BlockActor", P], Iterator[R]],
               *args: P.args, **kwargs: P.kwargs) -> Iterator[Pending[R]]:
        handle: Any = actor
        refs = getattr(handle, method.__name__).options(num_returns="streaming").remote(*args, **kwargs)
        return (RayPending(ref) for ref in refs)

    def passed(self, pending: Pending[T]) -> T:
        return cast(T, ref_of(pending))

    def get(self, pending: Pending[T], timeout: float | None = None) -> T:
        import ray

        return cast(T, ray.get(ref_of(pending), timeout=timeout))

    def get_all(self, pendings: Sequence[Pending[T]], timeout: float | None = None) -> list[T]:
        import ray

        return cast(list[T], ray.get([ref_of(p) for p in pendings], timeout=timeout))

    def stop_actors(self, actors: list[ActorHandle]) -> None:
        import ray

        for actor in actors:
            handle: Any = actor
            ray.kill(handle)
        if self._group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._group)
            self._group = None

    def actor_lost(self, error: BaseException) -> bool:
        """A dead actor, or an activation it owned (lost with it), anywhere in the error's causes: a call to a
        live actor that needed the dead one's outputs fails with the owner's death as its cause."""
        from ray import exceptions

        lost = (exceptions.RayActorError, exceptions.ObjectLostError, exceptions.WorkerCrashedError,
                exceptions.NodeDiedError)
        seen: set[int] = set()
        todo: list[BaseException | None] = [error]
        while todo:
            e = todo.pop()
            if e is None or id(e) in seen:
                continue
            seen.add(id(e))
            if isinstance(e, lost):
                return True
            cause = getattr(e, "cause", None)
            todo += [cause if isinstance(cause, BaseException) else None, e.__cause__, e.__context__]
        return False

    def stop(self, actors: list[ActorHandle]) -> None:
        import ray

        self.stop_actors(actors)
        if self._started:
            ray.shutdown()
