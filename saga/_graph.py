"""A saga's steps as a graph: which step runs after which, checked at definition time.

A saga whose every step runs after the one declared before it is linear, and runs on
the linear path (one item per run). Any other shape (``after=`` naming other steps, or
none: a root) is a graph: each ready step is its own leased item, and compensation runs
in reverse dependency order. Pure data, built once when the saga is registered.
"""

from __future__ import annotations

import dis
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, get_type_hints

from typing_extensions import TypedDict, is_typeddict

from saga._checks import show
from saga._errors import DefinitionError
from saga._policy import resolve_annotations


@dataclass(frozen=True, slots=True)
class Graph:
    """The dependencies of a graph saga's steps (names), resolved and checked."""

    deps: dict[str, tuple[str, ...]]  # step -> the steps it runs after
    dependents: dict[str, tuple[str, ...]]  # step -> the steps that run after it
    ancestors: dict[str, frozenset[str]]  # step -> every step it transitively runs after
    order: tuple[str, ...]  # a topological order, declaration order among equals
    roots: tuple[str, ...]  # the steps a run starts with
    sinks: tuple[str, ...]  # the steps nothing runs after: the run's output

    def ready(self, completed: frozenset[str] | set[str], taken: set[str]) -> list[str]:
        """Steps not completed nor taken whose dependencies all completed, in
        declaration order."""
        return [
            s
            for s in self.order
            if s not in completed and s not in taken and all(d in completed for d in self.deps[s])
        ]

    def undo_ready(
        self,
        undoes: Callable[[str], bool],
        completed: set[str],
        compensated: set[str],
        running: set[str],
    ) -> list[str]:
        """The completed steps whose compensation may start now (``undoes``: the step has
        one), in reverse dependency order: every step that runs after it is settled:
        never ran, or undone (compensated, or without compensation and itself settled)."""
        settled: dict[str, bool] = {}
        ready = []
        for step in reversed(self.order):  # every dependent is looked at before its step
            after_settled = all(
                d not in running and (d not in completed or settled[d])
                for d in self.dependents[step]
            )
            if step not in completed:
                settled[step] = step not in running
                continue
            if not undoes(step):
                settled[step] = after_settled
                continue
            settled[step] = step in compensated
            if not settled[step] and after_settled:
                ready.append(step)
        return ready


def build(
    saga: str, steps: Sequence[tuple[str, Sequence[str] | None]], force: bool = False
) -> Graph | None:
    """The graph of ``steps`` ((name, names it runs after or None: after the previous
    one)), or None when they form a line (the linear path). Raises DefinitionError for
    unknown steps, a step after itself, and cycles."""
    names = [name for name, _ in steps]
    known = set(names)
    deps: dict[str, tuple[str, ...]] = {}
    for index, (name, after) in enumerate(steps):
        if after is None:
            deps[name] = (names[index - 1],) if index else ()
            continue
        for dep in after:
            if dep == name:
                raise DefinitionError(f"saga {saga!r}: step {name!r} cannot run after itself")
            if dep not in known:
                raise DefinitionError(
                    f"saga {saga!r}: step {name!r} runs after {dep!r}, which is not a step "
                    f"of this saga (its steps: {', '.join(names)})"
                )
        deps[name] = tuple(dict.fromkeys(after))
    line = all(deps[n] == ((names[i - 1],) if i else ()) for i, n in enumerate(names))
    if line and not force:  # children steps run as graph items, whatever the shape
        return None
    ancestors = _ancestors(saga, names, deps)
    dependents = {n: tuple(m for m in names if n in deps[m]) for n in names}
    order: list[str] = []
    while len(order) < len(names):  # no cycle (checked above): each pass places one
        order.append(next(n for n in names if n not in order and set(deps[n]) <= set(order)))
    return Graph(
        deps=deps,
        dependents=dependents,
        ancestors=ancestors,
        order=tuple(order),
        roots=tuple(n for n in names if not deps[n]),
        sinks=tuple(n for n in names if not dependents[n]),
    )


def _ancestors(
    saga: str, names: list[str], deps: dict[str, tuple[str, ...]]
) -> dict[str, frozenset[str]]:
    """Every step's transitive dependencies; a cycle is named in the error."""
    found: dict[str, frozenset[str]] = {}
    visiting: list[str] = []

    def visit(name: str) -> frozenset[str]:
        if name in found:
            return found[name]
        if name in visiting:
            cycle = [*visiting[visiting.index(name) :], name]
            raise DefinitionError(
                f"saga {saga!r}: its steps run after each other in a cycle: "
                + " -> ".join(reversed(cycle))
            )
        visiting.append(name)
        result: set[str] = set()
        for dep in deps[name]:
            result.add(dep)
            result |= visit(dep)
        visiting.pop()
        found[name] = frozenset(result)
        return found[name]

    for name in names:
        visit(name)
    return found


def check_reads(
    saga: Any, graph: Graph, functions: Sequence[tuple[str, Callable[..., Any], bool]]
) -> None:
    """Refuse a step (or compensation: ``True``) whose code reads the result of a step
    of this saga that is not among its ancestors (it may not have run, or may be running
    right now). Finds the steps a function names (globals, closures, nested functions);
    ``ctx.result`` checks the same rule when a run reads, whatever the code looks like.
    A function naming its own step (``b.retry``) reads nothing of it that this could
    tell: ``ctx.result`` refuses a step's own result when it runs."""
    for name, fn, compensation in functions:
        allowed = graph.ancestors[name] | {name}
        for other in _steps_named(saga, fn):
            if other not in allowed:
                what = f"compensation of {name!r}" if compensation else f"step {name!r}"
                raise DefinitionError(
                    f"saga {saga.name!r}: the {what} reads the result of step {other!r}, "
                    f"which it does not run after; add {other!r} to after= of {name!r}"
                )


def _steps_named(saga: Any, fn: Callable[..., Any]) -> Iterator[str]:
    """The names of this saga's steps that ``fn``'s code refers to."""
    fn = getattr(fn, "__wrapped__", fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        return
    scope: dict[str, Any] = dict(getattr(fn, "__globals__", {}))
    for var, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or (), strict=False):
        try:
            scope[var] = cell.cell_contents
        except ValueError:  # an empty cell: not bound yet
            continue
    for used in _names(code):
        value: Any = scope.get(used)
        if getattr(value, "saga", None) is saga and hasattr(value, "compensate"):
            yield value.name


#: The instructions that read a variable (as opposed to an attribute: ``ctx.input.items``
#: names no step, whatever ``items`` is at module level).
_VARIABLE_READS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_CLASSDEREF"})


def _names(code: types.CodeType) -> Iterator[str]:
    """The variables ``code`` (and the functions it defines) reads."""
    for instruction in dis.get_instructions(code):
        if instruction.opname in _VARIABLE_READS and isinstance(instruction.argval, str):
            yield instruction.argval
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names(const)


def dependencies(saga: Any, name: str, after: Any) -> tuple[str, ...]:
    """``after=`` of step ``name``: steps of this saga or their names, checked."""
    if isinstance(after, str) or not isinstance(after, Sequence):
        raise DefinitionError(f"saga {saga.name!r}: after= of step {name!r} takes a list")
    names = []
    for dep in after:
        owner = getattr(dep, "saga", None)
        if owner is not None and owner is not saga:
            raise DefinitionError(
                f"saga {saga.name!r}: step {name!r} cannot run after {show(dep)}, a step of "
                f"saga {owner.name!r}"
            )
        found = dep if isinstance(dep, str) else getattr(dep, "name", None)
        if not isinstance(found, str) or (owner is None and not isinstance(dep, str)):
            raise DefinitionError(
                f"saga {saga.name!r}: after= of step {name!r} takes steps or step names, "
                f"not {show(dep)}"
            )
        names.append(found)
    return tuple(names)


def shape(saga: Any) -> Graph | None:
    """The saga's graph as declared so far (None: linear, or not a valid graph yet)."""
    try:
        return build(saga.name, [(s.name, s.deps) for s in saga.steps])
    except DefinitionError:
        return None


def preview(saga: Any) -> Graph | None:
    """The graph registration would give the saga now (None: linear), its annotations
    and children steps' result types resolved as registration does, so that a
    fingerprint read before registration is the one its runs record; as declared so far
    when it cannot be registered yet."""
    try:
        resolve_annotations(saga, final=False)
        return of_saga(saga, saga._parkings, final=False)
    except DefinitionError:
        return shape(saga)


def of_saga(saga: Any, parkings: dict[str, Any], *, final: bool = True) -> Graph | None:
    """The graph of a saga being registered (None: linear), every rule checked (not
    ``final``: a preview, see :func:`preview`)."""
    spawns = [s for s in saga.steps if s.spawn is not None]
    graph = build(saga.name, [(s.name, s.deps) for s in saga.steps], force=bool(spawns))
    if graph is None:
        return None
    for step in spawns:  # a list of the child saga's outputs
        child = step.spawn.saga
        resolve_annotations(child, final=final)  # (it may be frozen after this one)
        step.result_type = list[output_type(child, child.graph or shape(child))]  # type: ignore[misc]
    if parkings:
        raise DefinitionError(
            f"saga {saga.name!r}: sleeps and waits are not supported yet in a saga whose "
            "steps run in parallel (declared with after=) or that starts child sagas"
        )
    functions: list[tuple[str, Callable[..., Any], bool]] = [
        (s.name, s.fn, False) for s in saga.steps
    ]
    functions += [(s.name, s.compensation.fn, True) for s in saga.steps if s.compensation]
    functions += [(s.name, s.spawn.inputs, False) for s in spawns]  # its code: the inputs
    check_reads(saga, graph, functions)
    return graph


def output_type(saga: Any, graph: Graph | None = None) -> Any:
    """A completed run's output type: the last step's result (linear), the one final
    step's (a graph), or a TypedDict of the final steps' results by name."""
    graph = graph or saga.graph
    if graph is None:
        return saga.steps[-1].result_type
    if len(graph.sinks) == 1:
        return saga.get_step(graph.sinks[0]).result_type
    fields = {name: saga.get_step(name).result_type for name in graph.sinks}
    return TypedDict(f"{saga.name}_output", fields)  # type: ignore[operator]


def check_read(graph: Graph | None, reader: str, read: str, compensation: bool) -> None:
    """A run's step reads only the results of the steps it runs after (a compensation,
    its own step's too)."""
    if graph is None or read in graph.ancestors[reader] or (compensation and read == reader):
        return
    raise DefinitionError(
        f"step {reader!r} does not run after {read!r}: it can only read the results of the "
        "steps it runs after (add it to after=)"
    )


def check_output(saga: Any) -> None:
    """A declared ``output=`` must be the type the runs end with (what ``result()``
    reads): the last step's result type, or the final steps' results by name (a
    TypedDict of the same fields)."""
    declared, actual = saga.declared_output, output_type(saga)
    if declared is None or declared == actual:
        return
    both_dicts = is_typeddict(declared) and is_typeddict(actual)
    if both_dicts and get_type_hints(declared) == get_type_hints(actual):
        return
    raise DefinitionError(
        f"saga {saga.name!r}: output={getattr(declared, '__name__', declared)!r}, but its "
        f"runs end with {getattr(actual, '__name__', actual)!r} (the result type of its "
        "final step, or of its final steps by name)"
    )
