"""Author the bundled ALFWorld games: `python -m services.envs.alfworld_games.make_games`.

Each game is a small ALFRED-style room written as a spec below; this script turns every spec
into `<name>/initial_state.pddl` (objects, initial facts, and the goal of ALFRED's goal library
for its task type) and `<name>/traj_data.json` (task type and parameters, read by alfworld's
handcoded expert and its task-description templates). The outputs are committed as package
data; the script stays so that a reviewer can see, and change, how they were made.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent

# ALFRED's goals (alfworld.gen.goal_library), '#' written as '-'. Kept here so that the games
# can be regenerated without alfworld installed.
GOALS = {
    "pick_and_place_simple": """(:goal (and (exists (?r - receptacle) (exists (?o - object) (and
        (inReceptacle ?o ?r) (objectType ?o {obj}Type) (receptacleType ?r {recep}Type))))))""",
    "pick_clean_then_place_in_recep": """(:goal (and (exists (?r - receptacle) (exists (?o - object) (and
        (cleanable ?o) (objectType ?o {obj}Type) (receptacleType ?r {recep}Type) (isClean ?o) (inReceptacle ?o ?r))))))""",
    "pick_heat_then_place_in_recep": """(:goal (and (exists (?r - receptacle) (exists (?o - object) (and
        (heatable ?o) (objectType ?o {obj}Type) (receptacleType ?r {recep}Type) (isHot ?o) (inReceptacle ?o ?r))))))""",
    "pick_cool_then_place_in_recep": """(:goal (and (exists (?r - receptacle) (exists (?o - object) (and
        (coolable ?o) (objectType ?o {obj}Type) (receptacleType ?r {recep}Type) (isCool ?o) (inReceptacle ?o ?r))))))""",
    "pick_two_obj_and_place": """(:goal (and (exists (?r - receptacle) (exists (?o1 - object) (and
        (objectType ?o1 {obj}Type) (receptacleType ?r {recep}Type) (inReceptacle ?o1 ?r)
        (exists (?o2 - object) (and (not (= ?o1 ?o2)) (objectType ?o2 {obj}Type) (receptacleType ?r {recep}Type)
        (inReceptacle ?o2 ?r))))))))""",
    "look_at_obj_in_light": """(:goal (and
        (exists (?ot - object ?r - receptacle ?a - agent ?l - location) (and (objectType ?ot {toggle}Type)
        (toggleable ?ot) (isToggled ?ot) (receptacleAtLocation ?r ?l) (atLocation ?a ?l) (inReceptacle ?ot ?r)))
        (exists (?o - object ?a - agent) (and (objectType ?o {obj}Type) (holds ?a ?o)))))""",
}

OPENABLE = {"Cabinet", "Drawer", "Fridge", "Microwave", "Safe"}
FOOD = {"Apple", "Tomato", "Potato", "Egg", "Lettuce", "Bread"}
DISHES = {"Mug", "Cup", "Bowl", "Plate", "Pan", "Pot"}
CLEANABLE = FOOD | DISHES | {"Knife", "Fork", "Spoon", "Spatula", "Ladle", "ButterKnife", "SoapBar", "Cloth", "DishSponge"}
HEATABLE = FOOD | {"Mug", "Cup", "Plate"}
COOLABLE = FOOD | DISHES | {"WineBottle"}
TOGGLEABLE = {"DeskLamp", "FloorLamp"}
RECEPTACLE_OBJECTS = {"Mug", "Cup", "Bowl", "Plate", "Pan", "Pot"}

# A room: receptacles (type -> count), objects (type, receptacle instance), the task.
GAMES = {
    "pick_soapbar_toilet": {
        "task_type": "pick_and_place_simple", "obj": "SoapBar", "recep": "Toilet",
        "receptacles": {"Cabinet": 2, "CounterTop": 1, "SinkBasin": 1, "Toilet": 1, "GarbageCan": 1, "Shelf": 2},
        "objects": [("SoapBar", "Cabinet 2"), ("Cloth", "Cabinet 1"), ("SprayBottle", "Toilet 1"),
                    ("ToiletPaper", "Shelf 1"), ("Candle", "CounterTop 1"), ("SoapBottle", "Shelf 2")],
    },
    "pick_apple_countertop": {
        # Eleven cabinets: "cabinet 1" must never match "cabinet 10" or "cabinet 11".
        "task_type": "pick_and_place_simple", "obj": "Apple", "recep": "CounterTop",
        "receptacles": {"Cabinet": 11, "CounterTop": 1, "Fridge": 1, "DiningTable": 1, "SinkBasin": 1},
        "objects": [("Apple", "Cabinet 10"), ("Mug", "Cabinet 1"), ("Bowl", "Cabinet 11"), ("Plate", "DiningTable 1"),
                    ("Knife", "CounterTop 1"), ("Egg", "Fridge 1")],
    },
    "look_book_desklamp": {
        "task_type": "look_at_obj_in_light", "obj": "Book", "toggle": "DeskLamp",
        "receptacles": {"Bed": 1, "Desk": 1, "Drawer": 2, "SideTable": 1, "Shelf": 1, "GarbageCan": 1},
        "objects": [("Book", "Bed 1"), ("DeskLamp", "SideTable 1"), ("Pencil", "Desk 1"), ("CellPhone", "Drawer 1"),
                    ("KeyChain", "Drawer 2"), ("CD", "Shelf 1"), ("Pillow", "Bed 1")],
    },
    "clean_mug_coffeemachine": {
        "task_type": "pick_clean_then_place_in_recep", "obj": "Mug", "recep": "CoffeeMachine",
        "receptacles": {"Cabinet": 3, "CounterTop": 2, "SinkBasin": 1, "CoffeeMachine": 1, "Fridge": 1, "Microwave": 1},
        "objects": [("Mug", "CounterTop 2"), ("Apple", "Fridge 1"), ("Cup", "Cabinet 2"), ("Spatula", "CounterTop 1"),
                    ("DishSponge", "SinkBasin 1"), ("Bread", "CounterTop 1")],
    },
    "heat_potato_diningtable": {
        "task_type": "pick_heat_then_place_in_recep", "obj": "Potato", "recep": "DiningTable",
        "receptacles": {"Cabinet": 2, "CounterTop": 1, "Fridge": 1, "Microwave": 1, "DiningTable": 1, "StoveBurner": 2},
        "objects": [("Potato", "Fridge 1"), ("Tomato", "CounterTop 1"), ("Pan", "StoveBurner 1"), ("Plate", "Cabinet 1"),
                    ("Fork", "DiningTable 1")],
    },
    "cool_tomato_countertop": {
        "task_type": "pick_cool_then_place_in_recep", "obj": "Tomato", "recep": "CounterTop",
        "receptacles": {"Cabinet": 2, "CounterTop": 1, "Fridge": 1, "Microwave": 1, "DiningTable": 1, "GarbageCan": 1},
        "objects": [("Tomato", "DiningTable 1"), ("Lettuce", "Fridge 1"), ("Bowl", "Cabinet 2"), ("Spoon", "CounterTop 1"),
                    ("Egg", "DiningTable 1")],
    },
    "two_creditcard_dresser": {
        # Both cards on the sofa: alfworld's handcoded expert returns to where it first saw the
        # object class, so a second card elsewhere makes it loop (its known limitation).
        "task_type": "pick_two_obj_and_place", "obj": "CreditCard", "recep": "Dresser",
        "receptacles": {"Dresser": 1, "Drawer": 3, "Sofa": 1, "CoffeeTable": 1, "SideTable": 1},
        "objects": [("CreditCard", "Sofa 1"), ("CreditCard", "Sofa 1"), ("RemoteControl", "CoffeeTable 1"),
                    ("Watch", "SideTable 1"), ("KeyChain", "Drawer 1"), ("Statue", "Dresser 1")],
    },
}


def _ident(kind: str, i: int) -> str:
    # ALFRED mangles ids as "Type|x|y|z"; alfworld's Demangler turns "Type_bar_..." into "type N".
    # Basins are "Sink|...|SinkBasin" in ALFRED, which the Demangler names "sinkbasin N".
    if kind.endswith("Basin"):
        return f"{kind[: -len('Basin')]}_bar_{i}_bar_{kind}"
    return f"{kind}_bar_{i}"


def make_problem(name: str, spec: dict) -> tuple[str, dict]:
    receps: list[tuple[str, str]] = []  # (id, type)
    for kind, count in spec["receptacles"].items():
        receps += [(_ident(kind, i), kind) for i in range(1, count + 1)]
    by_label = {f"{kind} {i}": _ident(kind, i) for kind, count in spec["receptacles"].items() for i in range(1, count + 1)}
    objects, seen = [], {}
    for kind, where in spec["objects"]:
        seen[kind] = seen.get(kind, 0) + 1
        objects.append((_ident(kind, seen[kind]), kind, by_label[where]))
    if spec["task_type"] == "look_at_obj_in_light":
        pass  # the lamp is an object in the list like any other
    locations = {rid: f"loc_bar_{n}" for n, (rid, _) in enumerate(receps, start=1)}
    otypes = sorted({k for _, k, _ in objects})
    rtypes = sorted({k for _, k in receps})
    decl = ["agent1 - agent", "loc_bar_0 - location", *[f"{loc} - location" for loc in locations.values()],
            *[f"{rid} - receptacle" for rid, _ in receps], *[f"{oid} - object" for oid, _, _ in objects],
            *[f"{t}Type - otype" for t in otypes], *[f"{t}Type - rtype" for t in rtypes]]
    # The goal names types that may not be in the room (e.g. the target receptacle type).
    for key in ("obj", "toggle"):
        if key in spec and spec[key] not in otypes:
            decl.append(f"{spec[key]}Type - otype")
    if "recep" in spec and spec["recep"] not in rtypes:
        decl.append(f"{spec['recep']}Type - rtype")
    init = ["(atLocation agent1 loc_bar_0)"]
    for rid, kind in receps:
        init.append(f"(receptacleType {rid} {kind}Type)")
        init.append(f"(receptacleAtLocation {rid} {locations[rid]})")
        if kind in OPENABLE:
            init.append(f"(openable {rid})")
        # Every receptacle can hold every small object of the room (ALFRED's tables are finer;
        # for hand-made rooms this keeps every task reachable).
        for t in otypes:
            if t not in TOGGLEABLE:
                init.append(f"(canContain {kind}Type {t}Type)")
    for oid, kind, rid in objects:
        init += [f"(objectType {oid} {kind}Type)", f"(inReceptacle {oid} {rid})", f"(objectAtLocation {oid} {locations[rid]})"]
        if kind in TOGGLEABLE:
            init.append(f"(toggleable {oid})")
            continue
        init.append(f"(pickupable {oid})")
        for prop, kinds in (("cleanable", CLEANABLE), ("heatable", HEATABLE), ("coolable", COOLABLE),
                            ("isReceptacleObject", RECEPTACLE_OBJECTS)):
            if kind in kinds:
                init.append(f"({prop} {oid})")
    goal = GOALS[spec["task_type"]].format(obj=spec.get("obj", ""), recep=spec.get("recep", ""),
                                           toggle=spec.get("toggle", ""))
    pddl = (f"(define (problem {name})\n(:domain alfred)\n(:objects\n    " + "\n    ".join(decl) + "\n)\n(:init\n    "
            + "\n    ".join(init) + f"\n)\n{goal}\n)\n")
    traj = {
        "task_type": spec["task_type"],
        "pddl_params": {"object_target": spec.get("obj", ""), "parent_target": spec.get("recep", ""),
                        "toggle_target": spec.get("toggle", ""), "mrecep_target": "", "object_sliced": False},
        "source": "hand-authored for gtr-turbo (services/envs/alfworld_games/make_games.py)",
    }
    return pddl, traj


def main() -> None:
    for name, spec in GAMES.items():
        pddl, traj = make_problem(name, spec)
        d = HERE / name
        d.mkdir(exist_ok=True)
        (d / "initial_state.pddl").write_text(pddl)
        (d / "traj_data.json").write_text(json.dumps(traj, indent=2) + "\n")
        # A package each, so that setuptools' package-data globs ship the files in a wheel too.
        (d / "__init__.py").write_text('"""Bundled ALFWorld game (data only), written by make_games.py."""\n')
        print(f"wrote {d}")


if __name__ == "__main__":
    main()
