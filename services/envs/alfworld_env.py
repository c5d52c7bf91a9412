"""ALFWorld in its text engine (TextWorld + PDDL), as RL4VLM / GTR ran it, minus their defects.

- Real games when `ALFWORLD_DATA` points at an `alfworld-download` tree (splits train /
  valid_seen / valid_unseen, as alfworld's own loader filters them); otherwise the small set of
  hand-authored ALFRED-style games bundled in `services/envs/alfworld_games/` (DESIGN §6).
- Reward per step as in the paper's runs: 50 x won + goal-condition rate, minus 1 for an
  inadmissible action. The rate comes from the PDDL goal (`goal_conditions.py`).
- The action must equal an admissible command (case and spacing normalised). RL4VLM took the
  first admissible command contained in the text ("cabinet 1" inside "cabinet 10") and played a
  random one when nothing matched; here an inadmissible action is "Nothing happens." and -1,
  and the engine does not move.
- 50 steps, then truncated. The admissible actions are in the observation and the instruction.
- alfworld's handcoded expert runs alongside (`info["expert_action"]`), with its own seeded
  generator per session instead of the global `random`.

The visual ALFWorld (AI2-THOR) is not provided: it needs a Unity download and a display.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import tempfile
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from services.envs.base import EnvOptionError, EnvUnavailable, Obs, StepResult, TextActionEnv, base_info
from services.envs.goal_conditions import GoalConditions
from services.envs.parsing import ParsedAnswer

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'gtr-turbo[alfworld]'"
TASK_TYPES = {1: "pick_and_place_simple", 2: "look_at_obj_in_light", 3: "pick_clean_then_place_in_recep",
              4: "pick_heat_then_place_in_recep", 5: "pick_cool_then_place_in_recep", 6: "pick_two_obj_and_place"}
SPLITS = {"train": "train", "valid_seen": "valid_seen", "valid_unseen": "valid_unseen"}
INVALID_FEEDBACK = "Nothing happens."
WIN_REWARD = 50.0
INVALID_PENALTY = 1.0
_BANNER = re.compile(r"-= Welcome to TextWorld, ALFRED! =-\s*")

# One engine call at a time in a process: fast-downward's PDDL translator (load, reset) and
# TextWorld's command grammar (a module-global tatsu parser, used by every step) keep module state;
# concurrent steps corrupted it ("IndexError: pop from empty list", found with 8 sessions on 4
# threads). ALFWorld sessions step in parallel across the service's worker processes instead.
_ENGINE_LOCK = threading.RLock()


def alfworld_status() -> tuple[bool, str]:
    """(importable, message) without importing the heavy modules twice."""
    try:
        import alfworld  # noqa: F401
        import textworld  # noqa: F401
        from textworld.envs.pddl import pddl  # noqa: F401
    except ImportError as e:
        return False, f"alfworld is not installed ({e}); install it with {INSTALL_HINT}"
    return True, "ok"


class _ThreadRandom:
    """Stands in for the `random` module inside alfworld's handcoded expert: each thread uses
    the generator of the session it is stepping, so experts are reproducible and independent."""

    _local = threading.local()
    _fallback = random.Random()

    def use(self, rng: random.Random) -> None:
        self._local.rng = rng

    def __getattr__(self, name: str):
        return getattr(getattr(self._local, "rng", self._fallback), name)


_THREAD_RANDOM = _ThreadRandom()
_PATCHED = False


def _alfworld_modules():
    global _PATCHED
    ok, msg = alfworld_status()
    if not ok:
        raise EnvUnavailable(msg)
    import alfworld
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredExpertType, AlfredInfos
    from alfworld.agents.expert import handcoded_expert
    from alfworld.agents.utils.misc import add_task_to_grammar

    if not _PATCHED:
        handcoded_expert.random = _THREAD_RANDOM
        _PATCHED = True
    data = Path(alfworld.__file__).parent / "data"
    return textworld, AlfredDemangler, AlfredExpert, AlfredExpertType, AlfredInfos, add_task_to_grammar, data


# ------------------------------------------------------------------------------------ game files


def bundled_games_dir() -> Path:
    return Path(str(resources.files("services.envs") / "alfworld_games"))


def bundled_game_names() -> list[str]:
    root = bundled_games_dir()
    return sorted(p.name for p in root.iterdir() if (p / "initial_state.pddl").exists())


_BUILD_LOCK = threading.Lock()


def build_bundled_games() -> list[Path]:
    """Turn the bundled PDDL problems into `game.tw-pddl` files (domain + grammar with the task
    text + problem) in a cache folder, each beside its traj_data.json (the expert reads it)."""
    _, _, _, _, _, add_task_to_grammar, data = _alfworld_modules()
    domain = (data / "alfred.pddl").read_text()
    grammar = (data / "alfred.twl2").read_text()
    root = bundled_games_dir()
    digest = hashlib.sha256()
    for name in bundled_game_names():
        for f in ("initial_state.pddl", "traj_data.json"):
            digest.update((root / name / f).read_bytes())
    digest.update(domain.encode() + grammar.encode())
    out = Path(tempfile.gettempdir()) / f"gtr-alfworld-games-{digest.hexdigest()[:12]}"
    files = []
    with _BUILD_LOCK:
        for name in bundled_game_names():
            gamefile = out / name / "game.tw-pddl"
            files.append(gamefile)
            if gamefile.exists():
                continue
            gamefile.parent.mkdir(parents=True, exist_ok=True)
            traj = json.loads((root / name / "traj_data.json").read_text())
            # alfworld picks one of two templates with the global `random`: fix it per game.
            state = random.getstate()
            random.seed(name)
            game = {"pddl_domain": domain, "grammar": add_task_to_grammar(grammar, traj),
                    "pddl_problem": (root / name / "initial_state.pddl").read_text(), "solvable": True}
            random.setstate(state)
            (gamefile.parent / "traj_data.json").write_text(json.dumps(traj))
            tmp = gamefile.with_suffix(".tmp")
            tmp.write_text(json.dumps(game))
            tmp.replace(gamefile)
    return files


def dataset_games(data_root: str | Path, split: str, task_types: list[int]) -> list[Path]:
    """Solvable games of an `alfworld-download` tree, filtered like alfworld's AlfredTWEnv."""
    base = Path(data_root) / "json_2.1.1" / SPLITS[split]
    if not base.is_dir():
        raise EnvUnavailable(f"ALFWORLD_DATA={data_root} has no {base.relative_to(data_root)}; run `alfworld-download`")
    wanted = {TASK_TYPES[t] for t in task_types}
    games = []
    for traj_path in sorted(base.rglob("traj_data.json")):
        root = traj_path.parent
        if "movable" in str(root) or "Sliced" in str(root):
            continue
        gamefile = root / "game.tw-pddl"
        if not gamefile.exists():
            continue
        if json.loads(traj_path.read_text()).get("task_type") not in wanted:
            continue
        if not json.loads(gamefile.read_text()).get("solvable", False):
            continue
        games.append(gamefile)
    return games


# ------------------------------------------------------------------------------------------ env


def _thought_for(action: str, task: str) -> str:
    verb = action.split(" ", 1)[0]
    rest = action[len(verb):].strip()
    templates = {
        "go": f"To {task}, I should check {rest[3:] if rest.startswith('to ') else rest} next.",
        "open": f"The {rest} is closed; I open it to see inside.",
        "close": f"I am done with the {rest}, so I close it.",
        "take": f"I found what I need: I take the {rest.split(' from ')[0]}.",
        "move": f"I hold the {rest.split(' to ')[0]}; I put it here to {task}.",
        "clean": f"The task needs it clean, so I {action}.",
        "heat": f"The task needs it hot, so I {action}.",
        "cool": f"The task needs it cool, so I {action}.",
        "use": f"I turn on the {rest} to {task}.",
        "examine": f"I take a closer look: {action}.",
        "look": "I look around to see where I am.",
        "inventory": "I check what I am carrying.",
    }
    return templates.get(verb, f"To {task}, I {action}.")


class AlfWorldEnv(TextActionEnv):
    env_id = "alfworld"
    description = ("ALFWorld's text engine (TextWorld PDDL): household tasks; reward 50 x won + goal-condition "
                   "rate, -1 for an inadmissible action; 50 steps.")
    default_options = {"split": "auto", "task_types": [1, 2, 3, 4, 5, 6], "game": None, "max_steps": 50}
    max_steps = 50
    lists_admissible_actions = True
    fast = False  # a step is ~20 ms and a reset may load a game: one worker per session in a batch

    def __init__(self, *, data_root: str | None = None, **options: Any):
        """`data_root`: an alfworld-download tree (default: `ALFWORLD_DATA`). Server configuration,
        never a session option: a client must not choose which directories the service reads."""
        self.data_root = data_root or os.environ.get("ALFWORLD_DATA") or None
        super().__init__(**options)

    def _check_options(self) -> None:
        o = self.options
        if not isinstance(o["split"], str) or o["split"] not in ("auto", "bundled", *SPLITS):
            raise EnvOptionError(f"alfworld: option 'split' must be one of auto, bundled, {', '.join(SPLITS)}")
        tt = o["task_types"]
        if (not isinstance(tt, list) or not tt
                or any(isinstance(t, bool) or not isinstance(t, int) or t not in TASK_TYPES for t in tt)):
            raise EnvOptionError(f"alfworld: option 'task_types' must be a non-empty list of integers from "
                                 f"{sorted(TASK_TYPES)}")
        if o["game"] is not None and not isinstance(o["game"], str):
            raise EnvOptionError("alfworld: option 'game' must be a game's name (a string) or null")
        if isinstance(o["max_steps"], bool) or not isinstance(o["max_steps"], int) or not 1 <= o["max_steps"] <= 1000:
            raise EnvOptionError("alfworld: option 'max_steps' must be an integer in 1..1000")
        self._modules = _alfworld_modules()  # raises EnvUnavailable with the install hint
        data_path = self.data_root
        split = o["split"]
        if split == "auto":
            split = "train" if data_path and (Path(data_path) / "json_2.1.1").is_dir() else "bundled"
        if split == "bundled":
            games = build_bundled_games()
            wanted = {TASK_TYPES[t] for t in tt}
            games = [g for g in games if json.loads((g.parent / "traj_data.json").read_text())["task_type"] in wanted]
        else:
            if not data_path:
                raise EnvUnavailable(f"alfworld split {split!r} needs game data: serve with --alfworld-data DIR "
                                     "(or ALFWORLD_DATA), an alfworld-download tree")
            games = dataset_games(data_path, split, tt)
        if o["game"] is not None:
            games = [g for g in games if g.parent.name == o["game"] or str(g.parent).endswith(str(o["game"]))]
            if not games:
                raise EnvOptionError(f"alfworld: no game named {o['game']!r} in split {split!r}")
        if not games:
            raise EnvUnavailable(f"alfworld: no games for split {split!r} and task types {tt}")
        self.split, self.games = split, games
        self._env = None
        self._gamefile: Path | None = None
        self.expert_rng = random.Random(0)

    def close(self) -> None:
        if self._env is not None:
            with _ENGINE_LOCK:
                self._env.close()
            self._env = None

    # -- engine ------------------------------------------------------------------------------------
    def _load(self, gamefile: Path) -> None:
        textworld, Demangler, Expert, ExpertType, Infos, _, _ = self._modules
        infos = textworld.EnvInfos(won=True, admissible_commands=True, facts=True, extras=["gamefile", "expert_plan"])
        with _ENGINE_LOCK:
            if self._env is not None:
                self._env.close()
            self._env = textworld.start(str(gamefile), infos,
                                        wrappers=[Demangler(), Infos, Expert(ExpertType.HANDCODED)])
            self._env.load(str(gamefile))
        problem = json.loads(gamefile.read_text())["pddl_problem"]
        self.goal = GoalConditions(problem)
        traj = gamefile.parent / "traj_data.json"
        self.task_type = json.loads(traj.read_text()).get("task_type") if traj.exists() else None
        self._gamefile = gamefile

    def _update(self, state) -> None:
        self.state = state
        facts = {(p.name.lower(), tuple(v.name.lower() for v in p.arguments)) for p in state["_facts"]}
        if not hasattr(self, "_domain") or self._domain_game != self._gamefile:
            domain: dict[str, set[str]] = {}
            for p in state["_facts"]:
                for v in p.arguments:
                    domain.setdefault(v.type.lower(), set()).add(v.name.lower())
            self._domain = {k: sorted(v) for k, v in domain.items()}
            self._domain_game = self._gamefile
        self.gc_rate = self.goal.rate(facts, self._domain)
        self.admissible = [c for c in state["admissible_commands"] if c != "help"]

    def _reset(self, options: dict[str, Any]) -> tuple[Obs, dict[str, Any]]:
        if options:
            raise EnvOptionError("alfworld: reset takes no options (set them when creating the session)")
        gamefile = self.games[self.rng_int(0, len(self.games) - 1)]
        self.expert_rng = random.Random(int(self.np_random.integers(2**31)))
        _THREAD_RANDOM.use(self.expert_rng)
        if gamefile != self._gamefile:
            self._load(gamefile)
        with _ENGINE_LOCK:  # a reset translates the PDDL problem again
            state = self._env.reset()
        self.steps = 0
        text = _BANNER.sub("", state["feedback"]).strip()
        m = re.search(r"Your task is to: (.*?)\.?\s*$", text, re.S)
        self.task = m.group(1).strip() if m else ""
        self._update(state)
        # The task sentence is in the instruction already; the scene text stands alone.
        scene = text[: m.start()].strip() if m else text
        return self._obs(scene), self._info(ParsedAnswer(True), None, True, event="reset")

    def _act(self, parsed: ParsedAnswer) -> StepResult:
        self.steps += 1
        action = " ".join(parsed.action.lower().split()) if parsed.format_ok else None
        valid = action is not None and action in self.admissible
        won = False
        if valid:
            _THREAD_RANDOM.use(self.expert_rng)
            with _ENGINE_LOCK:
                state, _, done = self._env.step(action)
            self._update(state)
            won = bool(state["won"])
            feedback = state["feedback"].strip()
            event = "won" if won else "acted"
        else:
            feedback = INVALID_FEEDBACK
            event = "unparseable output" if action is None else f"{action!r} is not an admissible action"
        reward = WIN_REWARD * won + self.gc_rate - (0.0 if valid else INVALID_PENALTY)
        truncated = not won and self.steps >= self.options["max_steps"]
        info = self._info(parsed, action if valid else None, valid, won=won, event=event)
        return StepResult(self._obs(feedback), reward, won, truncated, info)

    # -- expert and observation --------------------------------------------------------------------
    def expert(self) -> tuple[str | None, str]:
        plan = self.state.get("extra.expert_plan") or []
        action = plan[0] if plan and plan[0] in self.admissible else None
        if action is None:
            return None, "I am not sure what to do next."
        return action, _thought_for(action, self.task)

    def _info(self, parsed: ParsedAnswer, action: str | None, valid: bool, won: bool = False, event: str = "") -> dict:
        return base_info(parsed, action, valid, won, task=self.task, task_type=self.task_type,
                         goal_condition_rate=self.gc_rate, game=self._gamefile.parent.name, split=self.split,
                         steps=self.steps, event=event, admissible_actions=list(self.admissible),
                         **self.expert_info())

    def _obs(self, feedback: str) -> Obs:
        self.last_feedback = feedback
        return Obs(text=feedback, instruction=self.instruction(feedback), image=None,
                   admissible_actions=list(self.admissible))

    def instruction(self, feedback: str) -> str:
        actions = ", ".join(f"'{a}'" for a in self.admissible)
        return ("You are an expert in the ALFRED Embodied Environment. You are given the following text description "
                f"of the current scene: {feedback} Your task is to: {self.task}. Your admissible actions of the "
                f"current situation are: [{actions}]. Your response should be a valid json file in the following "
                'format: {"thoughts": "{first describe what you see using the text description, then carefully '
                'think about which action completes the task}", "action": "{an admissible action}"}')


class AlfWorldThorEnv(TextActionEnv):
    """Listed so that users find it; it cannot run in this service (see `unavailable_reason`)."""

    env_id = "alfworld-thor"
    description = "ALFWorld's visual AI2-THOR version: not available in this service."
    unavailable_reason = ("the visual ALFWorld (AI2-THOR) is not supported by this service: it needs `pip install "
                          "ai2thor`, a Unity build downloaded by `alfworld-download --extra` and an X display (or "
                          "xvfb); use env 'alfworld' (the text engine) instead")

    def __init__(self, **options: Any):
        raise EnvUnavailable(self.unavailable_reason)
