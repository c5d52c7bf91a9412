(define (problem look_book_desklamp)
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
    Bed_bar_1 - receptacle
    Desk_bar_1 - receptacle
    Drawer_bar_1 - receptacle
    Drawer_bar_2 - receptacle
    SideTable_bar_1 - receptacle
    Shelf_bar_1 - receptacle
    GarbageCan_bar_1 - receptacle
    Book_bar_1 - object
    DeskLamp_bar_1 - object
    Pencil_bar_1 - object
    CellPhone_bar_1 - object
    KeyChain_bar_1 - object
    CD_bar_1 - object
    Pillow_bar_1 - object
    BookType - otype
    CDType - otype
    CellPhoneType - otype
    DeskLampType - otype
    KeyChainType - otype
    PencilType - otype
    PillowType - otype
    BedType - rtype
    DeskType - rtype
    DrawerType - rtype
    GarbageCanType - rtype
    ShelfType - rtype
    SideTableType - rtype
)
(:init
    (atLocation agent1 loc_bar_0)
    (receptacleType Bed_bar_1 BedType)
    (receptacleAtLocation Bed_bar_1 loc_bar_1)
    (canContain BedType BookType)
    (canContain BedType CDType)
    (canContain BedType CellPhoneType)
    (canContain BedType KeyChainType)
    (canContain BedType PencilType)
    (canContain BedType PillowType)
    (receptacleType Desk_bar_1 DeskType)
    (receptacleAtLocation Desk_bar_1 loc_bar_2)
    (canContain DeskType BookType)
    (canContain DeskType CDType)
    (canContain DeskType CellPhoneType)
    (canContain DeskType KeyChainType)
    (canContain DeskType PencilType)
    (canContain DeskType PillowType)
    (receptacleType Drawer_bar_1 DrawerType)
    (receptacleAtLocation Drawer_bar_1 loc_bar_3)
    (openable Drawer_bar_1)
    (canContain DrawerType BookType)
    (canContain DrawerType CDType)
    (canContain DrawerType CellPhoneType)
    (canContain DrawerType KeyChainType)
    (canContain DrawerType PencilType)
    (canContain DrawerType PillowType)
    (receptacleType Drawer_bar_2 DrawerType)
    (receptacleAtLocation Drawer_bar_2 loc_bar_4)
    (openable Drawer_bar_2)
    (canContain DrawerType BookType)
    (canContain DrawerType CDType)
    (canContain DrawerType CellPhoneType)
    (canContain DrawerType KeyChainType)
    (canContain DrawerType PencilType)
    (canContain DrawerType PillowType)
    (receptacleType SideTable_bar_1 SideTableType)
    (receptacleAtLocation SideTable_bar_1 loc_bar_5)
    (canContain SideTableType BookType)
    (canContain SideTableType CDType)
    (canContain SideTableType CellPhoneType)
    (canContain SideTableType KeyChainType)
    (canContain SideTableType PencilType)
    (canContain SideTableType PillowType)
    (receptacleType Shelf_bar_1 ShelfType)
    (receptacleAtLocation Shelf_bar_1 loc_bar_6)
    (canContain ShelfType BookType)
    (canContain ShelfType CDType)
    (canContain ShelfType CellPhoneType)
    (canContain ShelfType KeyChainType)
    (canContain ShelfType PencilType)
    (canContain ShelfType PillowType)
    (receptacleType GarbageCan_bar_1 GarbageCanType)
    (receptacleAtLocation GarbageCan_bar_1 loc_bar_7)
    (canContain GarbageCanType BookType)
    (canContain GarbageCanType CDType)
    (canContain GarbageCanType CellPhoneType)
    (canContain GarbageCanType KeyChainType)
    (canContain GarbageCanType PencilType)
    (canContain GarbageCanType PillowType)
    (objectType Book_bar_1 BookType)
    (inReceptacle Book_bar_1 Bed_bar_1)
    (objectAtLocation Book_bar_1 loc_bar_1)
    (pickupable Book_bar_1)
    (objectType DeskLamp_bar_1 DeskLampType)
    (inReceptacle DeskLamp_bar_1 SideTable_bar_1)
    (objectAtLocation DeskLamp_bar_1 loc_bar_5)
    (toggleable DeskLamp_bar_1)
    (objectType Pencil_bar_1 PencilType)
    (inReceptacle Pencil_bar_1 Desk_bar_1)
    (objectAtLocation Pencil_bar_1 loc_bar_2)
    (pickupable Pencil_bar_1)
    (objectType CellPhone_bar_1 CellPhoneType)
    (inReceptacle CellPhone_bar_1 Drawer_bar_1)
    (objectAtLocation CellPhone_bar_1 loc_bar_3)
    (pickupable CellPhone_bar_1)
    (objectType KeyChain_bar_1 KeyChainType)
    (inReceptacle KeyChain_bar_1 Drawer_bar_2)
    (objectAtLocation KeyChain_bar_1 loc_bar_4)
    (pickupable KeyChain_bar_1)
    (objectType CD_bar_1 CDType)
    (inReceptacle CD_bar_1 Shelf_bar_1)
    (objectAtLocation CD_bar_1 loc_bar_6)
    (pickupable CD_bar_1)
    (objectType Pillow_bar_1 PillowType)
    (inReceptacle Pillow_bar_1 Bed_bar_1)
    (objectAtLocation Pillow_bar_1 loc_bar_1)
    (pickupable Pillow_bar_1)
)
(:goal (and
        (exists (?ot - object ?r - receptacle ?a - agent ?l - location) (and (objectType ?ot DeskLampType)
        (toggleable ?ot) (isToggled ?ot) (receptacleAtLocation ?r ?l) (atLocation ?a ?l) (inReceptacle ?ot ?r)))
        (exists (?o - object ?a - agent) (and (objectType ?o BookType) (holds ?a ?o)))))
)
