(define (problem clean_mug_coffeemachine)
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
    Cabinet_bar_1 - receptacle
    Cabinet_bar_2 - receptacle
    Cabinet_bar_3 - receptacle
    CounterTop_bar_1 - receptacle
    CounterTop_bar_2 - receptacle
    Sink_bar_1_bar_SinkBasin - receptacle
    CoffeeMachine_bar_1 - receptacle
    Fridge_bar_1 - receptacle
    Microwave_bar_1 - receptacle
    Mug_bar_1 - object
    Apple_bar_1 - object
    Cup_bar_1 - object
    Spatula_bar_1 - object
    DishSponge_bar_1 - object
    Bread_bar_1 - object
    AppleType - otype
    BreadType - otype
    CupType - otype
    DishSpongeType - otype
    MugType - otype
    SpatulaType - otype
    CabinetType - rtype
    CoffeeMachineType - rtype
    CounterTopType - rtype
    FridgeType - rtype
    MicrowaveType - rtype
    SinkBasinType - rtype
)
(:init
    (atLocation agent1 loc_bar_0)
    (receptacleType Cabinet_bar_1 CabinetType)
    (receptacleAtLocation Cabinet_bar_1 loc_bar_1)
    (openable Cabinet_bar_1)
    (canContain CabinetType AppleType)
    (canContain CabinetType BreadType)
    (canContain CabinetType CupType)
    (canContain CabinetType DishSpongeType)
    (canContain CabinetType MugType)
    (canContain CabinetType SpatulaType)
    (receptacleType Cabinet_bar_2 CabinetType)
    (receptacleAtLocation Cabinet_bar_2 loc_bar_2)
    (openable Cabinet_bar_2)
    (canContain CabinetType AppleType)
    (canContain CabinetType BreadType)
    (canContain CabinetType CupType)
    (canContain CabinetType DishSpongeType)
    (canContain CabinetType MugType)
    (canContain CabinetType SpatulaType)
    (receptacleType Cabinet_bar_3 CabinetType)
    (receptacleAtLocation Cabinet_bar_3 loc_bar_3)
    (openable Cabinet_bar_3)
    (canContain CabinetType AppleType)
    (canContain CabinetType BreadType)
    (canContain CabinetType CupType)
    (canContain CabinetType DishSpongeType)
    (canContain CabinetType MugType)
    (canContain CabinetType SpatulaType)
    (receptacleType CounterTop_bar_1 CounterTopType)
    (receptacleAtLocation CounterTop_bar_1 loc_bar_4)
    (canContain CounterTopType AppleType)
    (canContain CounterTopType BreadType)
    (canContain CounterTopType CupType)
    (canContain CounterTopType DishSpongeType)
    (canContain CounterTopType MugType)
    (canContain CounterTopType SpatulaType)
    (receptacleType CounterTop_bar_2 CounterTopType)
    (receptacleAtLocation CounterTop_bar_2 loc_bar_5)
    (canContain CounterTopType AppleType)
    (canContain CounterTopType BreadType)
    (canContain CounterTopType CupType)
    (canContain CounterTopType DishSpongeType)
    (canContain CounterTopType MugType)
    (canContain CounterTopType SpatulaType)
    (receptacleType Sink_bar_1_bar_SinkBasin SinkBasinType)
    (receptacleAtLocation Sink_bar_1_bar_SinkBasin loc_bar_6)
    (canContain SinkBasinType AppleType)
    (canContain SinkBasinType BreadType)
    (canContain SinkBasinType CupType)
    (canContain SinkBasinType DishSpongeType)
    (canContain SinkBasinType MugType)
    (canContain SinkBasinType SpatulaType)
    (receptacleType CoffeeMachine_bar_1 CoffeeMachineType)
    (receptacleAtLocation CoffeeMachine_bar_1 loc_bar_7)
    (canContain CoffeeMachineType AppleType)
    (canContain CoffeeMachineType BreadType)
    (canContain CoffeeMachineType CupType)
    (canContain CoffeeMachineType DishSpongeType)
    (canContain CoffeeMachineType MugType)
    (canContain CoffeeMachineType SpatulaType)
    (receptacleType Fridge_bar_1 FridgeType)
    (receptacleAtLocation Fridge_bar_1 loc_bar_8)
    (openable Fridge_bar_1)
    (canContain FridgeType AppleType)
    (canContain FridgeType BreadType)
    (canContain FridgeType CupType)
    (canContain FridgeType DishSpongeType)
    (canContain FridgeType MugType)
    (canContain FridgeType SpatulaType)
    (receptacleType Microwave_bar_1 MicrowaveType)
    (receptacleAtLocation Microwave_bar_1 loc_bar_9)
    (openable Microwave_bar_1)
    (canContain MicrowaveType AppleType)
    (canContain MicrowaveType BreadType)
    (canContain MicrowaveType CupType)
    (canContain MicrowaveType DishSpongeType)
    (canContain MicrowaveType MugType)
    (canContain MicrowaveType SpatulaType)
    (objectType Mug_bar_1 MugType)
    (inReceptacle Mug_bar_1 CounterTop_bar_2)
    (objectAtLocation Mug_bar_1 loc_bar_5)
    (pickupable Mug_bar_1)
    (cleanable Mug_bar_1)
    (heatable Mug_bar_1)
    (coolable Mug_bar_1)
    (isReceptacleObject Mug_bar_1)
    (objectType Apple_bar_1 AppleType)
    (inReceptacle Apple_bar_1 Fridge_bar_1)
    (objectAtLocation Apple_bar_1 loc_bar_8)
    (pickupable Apple_bar_1)
    (cleanable Apple_bar_1)
    (heatable Apple_bar_1)
    (coolable Apple_bar_1)
    (objectType Cup_bar_1 CupType)
    (inReceptacle Cup_bar_1 Cabinet_bar_2)
    (objectAtLocation Cup_bar_1 loc_bar_2)
    (pickupable Cup_bar_1)
    (cleanable Cup_bar_1)
    (heatable Cup_bar_1)
    (coolable Cup_bar_1)
    (isReceptacleObject Cup_bar_1)
    (objectType Spatula_bar_1 SpatulaType)
    (inReceptacle Spatula_bar_1 CounterTop_bar_1)
    (objectAtLocation Spatula_bar_1 loc_bar_4)
    (pickupable Spatula_bar_1)
    (cleanable Spatula_bar_1)
    (objectType DishSponge_bar_1 DishSpongeType)
    (inReceptacle DishSponge_bar_1 Sink_bar_1_bar_SinkBasin)
    (objectAtLocation DishSponge_bar_1 loc_bar_6)
    (pickupable DishSponge_bar_1)
    (cleanable DishSponge_bar_1)
    (objectType Bread_bar_1 BreadType)
    (inReceptacle Bread_bar_1 CounterTop_bar_1)
    (objectAtLocation Bread_bar_1 loc_bar_4)
    (pickupable Bread_bar_1)
    (cleanable Bread_bar_1)
    (heatable Bread_bar_1)
    (coolable Bread_bar_1)
)
(:goal (and (exists (?r - receptacle) (exists (?o - object) (and
        (cleanable ?o) (objectType ?o MugType) (receptacleType ?r CoffeeMachineType) (isClean ?o) (inReceptacle ?o ?r))))))
)
