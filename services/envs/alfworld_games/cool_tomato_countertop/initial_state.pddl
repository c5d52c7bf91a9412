(define (problem cool_tomato_countertop)
(:domain alfred)
(:objects
    agent1 - agent
    loc_bar_0 - location
    loc_bar_1 - location
    loc_bar_2 - location
    loc_bar_3 - location
    loc_bar_4 - location
    loc_bar_5 - location
    loc_bar_6 - location
    loc_bar_7 - location
    Cabinet_bar_1 - receptacle
    Cabinet_bar_2 - receptacle
    CounterTop_bar_1 - receptacle
    Fridge_bar_1 - receptacle
    Microwave_bar_1 - receptacle
    DiningTable_bar_1 - receptacle
    GarbageCan_bar_1 - receptacle
    Tomato_bar_1 - object
    Lettuce_bar_1 - object
    Bowl_bar_1 - object
    Spoon_bar_1 - object
    Egg_bar_1 - object
    BowlType - otype
    EggType - otype
    LettuceType - otype
    SpoonType - otype
    TomatoType - otype
    CabinetType - rtype
    CounterTopType - rtype
    DiningTableType - rtype
    FridgeType - rtype
    GarbageCanType - rtype
    MicrowaveType - rtype
)
(:init
    (atLocation agent1 loc_bar_0)
    (receptacleType Cabinet_bar_1 CabinetType)
    (receptacleAtLocation Cabinet_bar_1 loc_bar_1)
    (openable Cabinet_bar_1)
    (canContain CabinetType BowlType)
    (canContain CabinetType EggType)
    (canContain CabinetType LettuceType)
    (canContain CabinetType SpoonType)
    (canContain CabinetType TomatoType)
    (receptacleType Cabinet_bar_2 CabinetType)
    (receptacleAtLocation Cabinet_bar_2 loc_bar_2)
    (openable Cabinet_bar_2)
    (canContain CabinetType BowlType)
    (canContain CabinetType EggType)
    (canContain CabinetType LettuceType)
    (canContain CabinetType SpoonType)
    (canContain CabinetType TomatoType)
    (receptacleType CounterTop_bar_1 CounterTopType)
    (receptacleAtLocation CounterTop_bar_1 loc_bar_3)
    (canContain CounterTopType BowlType)
    (canContain CounterTopType EggType)
    (canContain CounterTopType LettuceType)
    (canContain CounterTopType SpoonType)
    (canContain CounterTopType TomatoType)
    (receptacleType Fridge_bar_1 FridgeType)
    (receptacleAtLocation Fridge_bar_1 loc_bar_4)
    (openable Fridge_bar_1)
    (canContain FridgeType BowlType)
    (canContain FridgeType EggType)
    (canContain FridgeType LettuceType)
    (canContain FridgeType SpoonType)
    (canContain FridgeType TomatoType)
    (receptacleType Microwave_bar_1 MicrowaveType)
    (receptacleAtLocation Microwave_bar_1 loc_bar_5)
    (openable Microwave_bar_1)
    (canContain MicrowaveType BowlType)
    (canContain MicrowaveType EggType)
    (canContain MicrowaveType LettuceType)
    (canContain MicrowaveType SpoonType)
    (canContain MicrowaveType TomatoType)
    (receptacleType DiningTable_bar_1 DiningTableType)
    (receptacleAtLocation DiningTable_bar_1 loc_bar_6)
    (canContain DiningTableType BowlType)
    (canContain DiningTableType EggType)
    (canContain DiningTableType LettuceType)
    (canContain DiningTableType SpoonType)
    (canContain DiningTableType TomatoType)
    (receptacleType GarbageCan_bar_1 GarbageCanType)
    (receptacleAtLocation GarbageCan_bar_1 loc_bar_7)
    (canContain GarbageCanType BowlType)
    (canContain GarbageCanType EggType)
    (canContain GarbageCanType LettuceType)
    (canContain GarbageCanType SpoonType)
    (canContain GarbageCanType TomatoType)
    (objectType Tomato_bar_1 TomatoType)
    (inReceptacle Tomato_bar_1 DiningTable_bar_1)
    (objectAtLocation Tomato_bar_1 loc_bar_6)
    (pickupable Tomato_bar_1)
    (cleanable Tomato_bar_1)
    (heatable Tomato_bar_1)
    (coolable Tomato_bar_1)
    (objectType Lettuce_bar_1 LettuceType)
    (inReceptacle Lettuce_bar_1 Fridge_bar_1)
    (objectAtLocation Lettuce_bar_1 loc_bar_4)
    (pickupable Lettuce_bar_1)
    (cleanable Lettuce_bar_1)
    (heatable Lettuce_bar_1)
    (coolable Lettuce_bar_1)
    (objectType Bowl_bar_1 BowlType)
    (inReceptacle Bowl_bar_1 Cabinet_bar_2)
    (objectAtLocation Bowl_bar_1 loc_bar_2)
    (pickupable Bowl_bar_1)
    (cleanable Bowl_bar_1)
    (coolable Bowl_bar_1)
    (isReceptacleObject Bowl_bar_1)
    (objectType Spoon_bar_1 SpoonType)
    (inReceptacle Spoon_bar_1 CounterTop_bar_1)
    (objectAtLocation Spoon_bar_1 loc_bar_3)
    (pickupable Spoon_bar_1)
    (cleanable Spoon_bar_1)
    (objectType Egg_bar_1 EggType)
    (inReceptacle Egg_bar_1 DiningTable_bar_1)
    (objectAtLocation Egg_bar_1 loc_bar_6)
    (pickupable Egg_bar_1)
    (cleanable Egg_bar_1)
    (heatable Egg_bar_1)
    (coolable Egg_bar_1)
)
(:goal (and (exists (?r - receptacle) (exists (?o - object) (and
        (coolable ?o) (objectType ?o TomatoType) (receptacleType ?r CounterTopType) (isCool ?o) (inReceptacle ?o ?r))))))
)
