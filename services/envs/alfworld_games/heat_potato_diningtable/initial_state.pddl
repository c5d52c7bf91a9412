(define (problem heat_potato_diningtable)
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
    Cabinet_bar_1 - receptacle
    Cabinet_bar_2 - receptacle
    CounterTop_bar_1 - receptacle
    Fridge_bar_1 - receptacle
    Microwave_bar_1 - receptacle
    DiningTable_bar_1 - receptacle
    StoveBurner_bar_1 - receptacle
    StoveBurner_bar_2 - receptacle
    Potato_bar_1 - object
    Tomato_bar_1 - object
    Pan_bar_1 - object
    Plate_bar_1 - object
    Fork_bar_1 - object
    ForkType - otype
    PanType - otype
    PlateType - otype
    PotatoType - otype
    TomatoType - otype
    CabinetType - rtype
    CounterTopType - rtype
    DiningTableType - rtype
    FridgeType - rtype
    MicrowaveType - rtype
    StoveBurnerType - rtype
)
(:init
    (atLocation agent1 loc_bar_0)
    (receptacleType Cabinet_bar_1 CabinetType)
    (receptacleAtLocation Cabinet_bar_1 loc_bar_1)
    (openable Cabinet_bar_1)
    (canContain CabinetType ForkType)
    (canContain CabinetType PanType)
    (canContain CabinetType PlateType)
    (canContain CabinetType PotatoType)
    (canContain CabinetType TomatoType)
    (receptacleType Cabinet_bar_2 CabinetType)
    (receptacleAtLocation Cabinet_bar_2 loc_bar_2)
    (openable Cabinet_bar_2)
    (canContain CabinetType ForkType)
    (canContain CabinetType PanType)
    (canContain CabinetType PlateType)
    (canContain CabinetType PotatoType)
    (canContain CabinetType TomatoType)
    (receptacleType CounterTop_bar_1 CounterTopType)
    (receptacleAtLocation CounterTop_bar_1 loc_bar_3)
    (canContain CounterTopType ForkType)
    (canContain CounterTopType PanType)
    (canContain CounterTopType PlateType)
    (canContain CounterTopType PotatoType)
    (canContain CounterTopType TomatoType)
    (receptacleType Fridge_bar_1 FridgeType)
    (receptacleAtLocation Fridge_bar_1 loc_bar_4)
    (openable Fridge_bar_1)
    (canContain FridgeType ForkType)
    (canContain FridgeType PanType)
    (canContain FridgeType PlateType)
    (canContain FridgeType PotatoType)
    (canContain FridgeType TomatoType)
    (receptacleType Microwave_bar_1 MicrowaveType)
    (receptacleAtLocation Microwave_bar_1 loc_bar_5)
    (openable Microwave_bar_1)
    (canContain MicrowaveType ForkType)
    (canContain MicrowaveType PanType)
    (canContain MicrowaveType PlateType)
    (canContain MicrowaveType PotatoType)
    (canContain MicrowaveType TomatoType)
    (receptacleType DiningTable_bar_1 DiningTableType)
    (receptacleAtLocation DiningTable_bar_1 loc_bar_6)
    (canContain DiningTableType ForkType)
    (canContain DiningTableType PanType)
    (canContain DiningTableType PlateType)
    (canContain DiningTableType PotatoType)
    (canContain DiningTableType TomatoType)
    (receptacleType StoveBurner_bar_1 StoveBurnerType)
    (receptacleAtLocation StoveBurner_bar_1 loc_bar_7)
    (canContain StoveBurnerType ForkType)
    (canContain StoveBurnerType PanType)
    (canContain StoveBurnerType PlateType)
    (canContain StoveBurnerType PotatoType)
    (canContain StoveBurnerType TomatoType)
    (receptacleType StoveBurner_bar_2 StoveBurnerType)
    (receptacleAtLocation StoveBurner_bar_2 loc_bar_8)
    (canContain StoveBurnerType ForkType)
    (canContain StoveBurnerType PanType)
    (canContain StoveBurnerType PlateType)
    (canContain StoveBurnerType PotatoType)
    (canContain StoveBurnerType TomatoType)
    (objectType Potato_bar_1 PotatoType)
    (inReceptacle Potato_bar_1 Fridge_bar_1)
    (objectAtLocation Potato_bar_1 loc_bar_4)
    (pickupable Potato_bar_1)
    (cleanable Potato_bar_1)
    (heatable Potato_bar_1)
    (coolable Potato_bar_1)
    (objectType Tomato_bar_1 TomatoType)
    (inReceptacle Tomato_bar_1 CounterTop_bar_1)
    (objectAtLocation Tomato_bar_1 loc_bar_3)
    (pickupable Tomato_bar_1)
    (cleanable Tomato_bar_1)
    (heatable Tomato_bar_1)
    (coolable Tomato_bar_1)
    (objectType Pan_bar_1 PanType)
    (inReceptacle Pan_bar_1 StoveBurner_bar_1)
    (objectAtLocation Pan_bar_1 loc_bar_7)
    (pickupable Pan_bar_1)
    (cleanable Pan_bar_1)
    (coolable Pan_bar_1)
    (isReceptacleObject Pan_bar_1)
    (objectType Plate_bar_1 PlateType)
    (inReceptacle Plate_bar_1 Cabinet_bar_1)
    (objectAtLocation Plate_bar_1 loc_bar_1)
    (pickupable Plate_bar_1)
    (cleanable Plate_bar_1)
    (heatable Plate_bar_1)
    (coolable Plate_bar_1)
    (isReceptacleObject Plate_bar_1)
    (objectType Fork_bar_1 ForkType)
    (inReceptacle Fork_bar_1 DiningTable_bar_1)
    (objectAtLocation Fork_bar_1 loc_bar_6)
    (pickupable Fork_bar_1)
    (cleanable Fork_bar_1)
)
(:goal (and (exists (?r - receptacle) (exists (?o - object) (and
        (heatable ?o) (objectType ?o PotatoType) (receptacleType ?r DiningTableType) (isHot ?o) (inReceptacle ?o ?r))))))
)
