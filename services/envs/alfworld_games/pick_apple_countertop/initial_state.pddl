(define (problem pick_apple_countertop)
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
    loc_bar_8 - location
    loc_bar_9 - location
    loc_bar_10 - location
    loc_bar_11 - location
    loc_bar_12 - location
    loc_bar_13 - location
    loc_bar_14 - location
    loc_bar_15 - location
    Cabinet_bar_1 - receptacle
    Cabinet_bar_2 - receptacle
    Cabinet_bar_3 - receptacle
    Cabinet_bar_4 - receptacle
    Cabinet_bar_5 - receptacle
    Cabinet_bar_6 - receptacle
    Cabinet_bar_7 - receptacle
    Cabinet_bar_8 - receptacle
    Cabinet_bar_9 - receptacle
    Cabinet_bar_10 - receptacle
    Cabinet_bar_11 - receptacle
    CounterTop_bar_1 - receptacle
    Fridge_bar_1 - receptacle
    DiningTable_bar_1 - receptacle
    Sink_bar_1_bar_SinkBasin - receptacle
    Apple_bar_1 - object
    Mug_bar_1 - object
    Bowl_bar_1 - object
    Plate_bar_1 - object
    Knife_bar_1 - object
    Egg_bar_1 - object
    AppleType - otype
    BowlType - otype
    EggType - otype
    KnifeType - otype
    MugType - otype
    PlateType - otype
    CabinetType - rtype
    CounterTopType - rtype
    DiningTableType - rtype
    FridgeType - rtype
    SinkBasinType - rtype
)
(:init
    (atLocation agent1 loc_bar_0)
    (receptacleType Cabinet_bar_1 CabinetType)
    (receptacleAtLocation Cabinet_bar_1 loc_bar_1)
    (openable Cabinet_bar_1)
    (canContain CabinetType AppleType)
    (canContain CabinetType BowlType)
    (canContain CabinetType EggType)
    (canContain CabinetType KnifeType)
    (canContain CabinetType MugType)
    (canContain CabinetType PlateType)
    (receptacleType Cabinet_bar_2 CabinetType)
    (receptacleAtLocation Cabinet_bar_2 loc_bar_2)
    (openable Cabinet_bar_2)
    (canContain CabinetType AppleType)
    (canContain CabinetType BowlType)
    (canContain CabinetType EggType)
    (canContain CabinetType KnifeType)
    (canContain CabinetType MugType)
    (canContain CabinetType PlateType)
    (receptacleType Cabinet_bar_3 CabinetType)
    (receptacleAtLocation Cabinet_bar_3 loc_bar_3)
    (openable Cabinet_bar_3)
    (canContain CabinetType AppleType)
    (canContain CabinetType BowlType)
    (canContain CabinetType EggType)
    (canContain CabinetType KnifeType)
    (canContain CabinetType MugType)
    (canContain CabinetType PlateType)
    (receptacleType Cabinet_bar_4 CabinetType)
    (receptacleAtLocation Cabinet_bar_4 loc_bar_4)
    (openable Cabinet_bar_4)
    (canContain CabinetType AppleType)
    (canContain CabinetType BowlType)
    (canContain CabinetType EggType)
    (canContain CabinetType KnifeType)
    (canContain CabinetType MugType)
    (canContain CabinetType PlateType)
    (receptacleType Cabinet_bar_5 CabinetType)
    (receptacleAtLocation Cabinet_bar_5 loc_bar_5)
    (openable Cabinet_bar_5)
    (canContain CabinetType AppleType)
    (canContain CabinetType BowlType)
    (canContain CabinetType EggType)
    (canContain CabinetType KnifeType)
    (canContain CabinetType MugType)
    (canContain CabinetType PlateType)
    (receptacleType Cabinet_bar_6 CabinetType)
    (receptacleAtLocation Cabinet_bar_6 loc_bar_6)
    (openable Cabinet_bar_6)
    (canContain CabinetType AppleType)
    (canContain CabinetType BowlType)
    (canContain CabinetType EggType)
    (canContain CabinetType KnifeType)
    (canContain CabinetType MugType)
    (canContain CabinetType PlateType)
    (receptacleType Cabinet_bar_7 CabinetType)
    (receptacleAtLocation Cabinet_bar_7 loc_bar_7)
    (openable Cabinet_bar_7)
    (canContain CabinetType AppleType)
    (canContain CabinetType BowlType)
    (canContain CabinetType EggType)
    (canContain CabinetType KnifeType)
    (canContain CabinetType MugType)
    (canContain CabinetType PlateType)
    (receptacleType Cabinet_bar_8 CabinetType)
    (receptacleAtLocation Cabinet_bar_8 loc_bar_8)
    (openable Cabinet_bar_8)
    (canContain CabinetType AppleType)
    (canContain CabinetType BowlType)
    (canContain CabinetType EggType)
    (canContain CabinetType KnifeType)
    (canContain CabinetType MugType)
    (canContain CabinetType PlateType)
    (receptacleType Cabinet_bar_9 CabinetType)
    (receptacleAtLocation Cabinet_bar_9 loc_bar_9)
    (openable Cabinet_bar_9)
    (canContain CabinetType AppleType)
    (canContain CabinetType BowlType)
    (canContain CabinetType EggType)
    (canContain CabinetType KnifeType)
    (canContain CabinetType MugType)
    (canContain CabinetType PlateType)
    (receptacleType Cabinet_bar_10 CabinetType)
    (receptacleAtLocation Cabinet_bar_10 loc_bar_10)
    (openable Cabinet_bar_10)
    (canContain CabinetType AppleType)
    (canContain CabinetType BowlType)
    (canContain CabinetType EggType)
    (canContain CabinetType KnifeType)
    (canContain CabinetType MugType)
    (canContain CabinetType PlateType)
    (receptacleType Cabinet_bar_11 CabinetType)
    (receptacleAtLocation Cabinet_bar_11 loc_bar_11)
    (openable Cabinet_bar_11)
    (canContain CabinetType AppleType)
    (canContain CabinetType BowlType)
    (canContain CabinetType EggType)
    (canContain CabinetType KnifeType)
    (canContain CabinetType MugType)
    (canContain CabinetType PlateType)
    (receptacleType CounterTop_bar_1 CounterTopType)
    (receptacleAtLocation CounterTop_bar_1 loc_bar_12)
    (canContain CounterTopType AppleType)
    (canContain CounterTopType BowlType)
    (canContain CounterTopType EggType)
    (canContain CounterTopType KnifeType)
    (canContain CounterTopType MugType)
    (canContain CounterTopType PlateType)
    (receptacleType Fridge_bar_1 FridgeType)
    (receptacleAtLocation Fridge_bar_1 loc_bar_13)
    (openable Fridge_bar_1)
    (canContain FridgeType AppleType)
    (canContain FridgeType BowlType)
    (canContain FridgeType EggType)
    (canContain FridgeType KnifeType)
    (canContain FridgeType MugType)
    (canContain FridgeType PlateType)
    (receptacleType DiningTable_bar_1 DiningTableType)
    (receptacleAtLocation DiningTable_bar_1 loc_bar_14)
    (canContain DiningTableType AppleType)
    (canContain DiningTableType BowlType)
    (canContain DiningTableType EggType)
    (canContain DiningTableType KnifeType)
    (canContain DiningTableType MugType)
    (canContain DiningTableType PlateType)
    (receptacleType Sink_bar_1_bar_SinkBasin SinkBasinType)
    (receptacleAtLocation Sink_bar_1_bar_SinkBasin loc_bar_15)
    (canContain SinkBasinType AppleType)
    (canContain SinkBasinType BowlType)
    (canContain SinkBasinType EggType)
    (canContain SinkBasinType KnifeType)
    (canContain SinkBasinType MugType)
    (canContain SinkBasinType PlateType)
    (objectType Apple_bar_1 AppleType)
    (inReceptacle Apple_bar_1 Cabinet_bar_10)
    (objectAtLocation Apple_bar_1 loc_bar_10)
    (pickupable Apple_bar_1)
    (cleanable Apple_bar_1)
    (heatable Apple_bar_1)
    (coolable Apple_bar_1)
    (objectType Mug_bar_1 MugType)
    (inReceptacle Mug_bar_1 Cabinet_bar_1)
    (objectAtLocation Mug_bar_1 loc_bar_1)
    (pickupable Mug_bar_1)
    (cleanable Mug_bar_1)
    (heatable Mug_bar_1)
    (coolable Mug_bar_1)
    (isReceptacleObject Mug_bar_1)
    (objectType Bowl_bar_1 BowlType)
    (inReceptacle Bowl_bar_1 Cabinet_bar_11)
    (objectAtLocation Bowl_bar_1 loc_bar_11)
    (pickupable Bowl_bar_1)
    (cleanable Bowl_bar_1)
    (coolable Bowl_bar_1)
    (isReceptacleObject Bowl_bar_1)
    (objectType Plate_bar_1 PlateType)
    (inReceptacle Plate_bar_1 DiningTable_bar_1)
    (objectAtLocation Plate_bar_1 loc_bar_14)
    (pickupable Plate_bar_1)
    (cleanable Plate_bar_1)
    (heatable Plate_bar_1)
    (coolable Plate_bar_1)
    (isReceptacleObject Plate_bar_1)
    (objectType Knife_bar_1 KnifeType)
    (inReceptacle Knife_bar_1 CounterTop_bar_1)
    (objectAtLocation Knife_bar_1 loc_bar_12)
    (pickupable Knife_bar_1)
    (cleanable Knife_bar_1)
    (objectType Egg_bar_1 EggType)
    (inReceptacle Egg_bar_1 Fridge_bar_1)
    (objectAtLocation Egg_bar_1 loc_bar_13)
    (pickupable Egg_bar_1)
    (cleanable Egg_bar_1)
    (heatable Egg_bar_1)
    (coolable Egg_bar_1)
)
(:goal (and (exists (?r - receptacle) (exists (?o - object) (and
        (inReceptacle ?o ?r) (objectType ?o AppleType) (receptacleType ?r CounterTopType))))))
)
