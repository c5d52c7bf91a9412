(define (problem two_creditcard_dresser)
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
    Dresser_bar_1 - receptacle
    Drawer_bar_1 - receptacle
    Drawer_bar_2 - receptacle
    Drawer_bar_3 - receptacle
    Sofa_bar_1 - receptacle
    CoffeeTable_bar_1 - receptacle
    SideTable_bar_1 - receptacle
    CreditCard_bar_1 - object
    CreditCard_bar_2 - object
    RemoteControl_bar_1 - object
    Watch_bar_1 - object
    KeyChain_bar_1 - object
    Statue_bar_1 - object
    CreditCardType - otype
    KeyChainType - otype
    RemoteControlType - otype
    StatueType - otype
    WatchType - otype
    CoffeeTableType - rtype
    DrawerType - rtype
    DresserType - rtype
    SideTableType - rtype
    SofaType - rtype
)
(:init
    (atLocation agent1 loc_bar_0)
    (receptacleType Dresser_bar_1 DresserType)
    (receptacleAtLocation Dresser_bar_1 loc_bar_1)
    (canContain DresserType CreditCardType)
    (canContain DresserType KeyChainType)
    (canContain DresserType RemoteControlType)
    (canContain DresserType StatueType)
    (canContain DresserType WatchType)
    (receptacleType Drawer_bar_1 DrawerType)
    (receptacleAtLocation Drawer_bar_1 loc_bar_2)
    (openable Drawer_bar_1)
    (canContain DrawerType CreditCardType)
    (canContain DrawerType KeyChainType)
    (canContain DrawerType RemoteControlType)
    (canContain DrawerType StatueType)
    (canContain DrawerType WatchType)
    (receptacleType Drawer_bar_2 DrawerType)
    (receptacleAtLocation Drawer_bar_2 loc_bar_3)
    (openable Drawer_bar_2)
    (canContain DrawerType CreditCardType)
    (canContain DrawerType KeyChainType)
    (canContain DrawerType RemoteControlType)
    (canContain DrawerType StatueType)
    (canContain DrawerType WatchType)
    (receptacleType Drawer_bar_3 DrawerType)
    (receptacleAtLocation Drawer_bar_3 loc_bar_4)
    (openable Drawer_bar_3)
    (canContain DrawerType CreditCardType)
    (canContain DrawerType KeyChainType)
    (canContain DrawerType RemoteControlType)
    (canContain DrawerType StatueType)
    (canContain DrawerType WatchType)
    (receptacleType Sofa_bar_1 SofaType)
    (receptacleAtLocation Sofa_bar_1 loc_bar_5)
    (canContain SofaType CreditCardType)
    (canContain SofaType KeyChainType)
    (canContain SofaType RemoteControlType)
    (canContain SofaType StatueType)
    (canContain SofaType WatchType)
    (receptacleType CoffeeTable_bar_1 CoffeeTableType)
    (receptacleAtLocation CoffeeTable_bar_1 loc_bar_6)
    (canContain CoffeeTableType CreditCardType)
    (canContain CoffeeTableType KeyChainType)
    (canContain CoffeeTableType RemoteControlType)
    (canContain CoffeeTableType StatueType)
    (canContain CoffeeTableType WatchType)
    (receptacleType SideTable_bar_1 SideTableType)
    (receptacleAtLocation SideTable_bar_1 loc_bar_7)
    (canContain SideTableType CreditCardType)
    (canContain SideTableType KeyChainType)
    (canContain SideTableType RemoteControlType)
    (canContain SideTableType StatueType)
    (canContain SideTableType WatchType)
    (objectType CreditCard_bar_1 CreditCardType)
    (inReceptacle CreditCard_bar_1 Sofa_bar_1)
    (objectAtLocation CreditCard_bar_1 loc_bar_5)
    (pickupable CreditCard_bar_1)
    (objectType CreditCard_bar_2 CreditCardType)
    (inReceptacle CreditCard_bar_2 Sofa_bar_1)
    (objectAtLocation CreditCard_bar_2 loc_bar_5)
    (pickupable CreditCard_bar_2)
    (objectType RemoteControl_bar_1 RemoteControlType)
    (inReceptacle RemoteControl_bar_1 CoffeeTable_bar_1)
    (objectAtLocation RemoteControl_bar_1 loc_bar_6)
    (pickupable RemoteControl_bar_1)
    (objectType Watch_bar_1 WatchType)
    (inReceptacle Watch_bar_1 SideTable_bar_1)
    (objectAtLocation Watch_bar_1 loc_bar_7)
    (pickupable Watch_bar_1)
    (objectType KeyChain_bar_1 KeyChainType)
    (inReceptacle KeyChain_bar_1 Drawer_bar_1)
    (objectAtLocation KeyChain_bar_1 loc_bar_2)
    (pickupable KeyChain_bar_1)
    (objectType Statue_bar_1 StatueType)
    (inReceptacle Statue_bar_1 Dresser_bar_1)
    (objectAtLocation Statue_bar_1 loc_bar_1)
    (pickupable Statue_bar_1)
)
(:goal (and (exists (?r - receptacle) (exists (?o1 - object) (and
        (objectType ?o1 CreditCardType) (receptacleType ?r DresserType) (inReceptacle ?o1 ?r)
        (exists (?o2 - object) (and (not (= ?o1 ?o2)) (objectType ?o2 CreditCardType) (receptacleType ?r DresserType)
        (inReceptacle ?o2 ?r))))))))
)
