(define (problem pick_soapbar_toilet)
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
    Sink_bar_1_bar_SinkBasin - receptacle
    Toilet_bar_1 - receptacle
    GarbageCan_bar_1 - receptacle
    Shelf_bar_1 - receptacle
    Shelf_bar_2 - receptacle
    SoapBar_bar_1 - object
    Cloth_bar_1 - object
    SprayBottle_bar_1 - object
    ToiletPaper_bar_1 - object
    Candle_bar_1 - object
    SoapBottle_bar_1 - object
    CandleType - otype
    ClothType - otype
    SoapBarType - otype
    SoapBottleType - otype
    SprayBottleType - otype
    ToiletPaperType - otype
    CabinetType - rtype
    CounterTopType - rtype
    GarbageCanType - rtype
    ShelfType - rtype
    SinkBasinType - rtype
    ToiletType - rtype
)
(:init
    (atLocation agent1 loc_bar_0)
    (receptacleType Cabinet_bar_1 CabinetType)
    (receptacleAtLocation Cabinet_bar_1 loc_bar_1)
    (openable Cabinet_bar_1)
    (canContain CabinetType CandleType)
    (canContain CabinetType ClothType)
    (canContain CabinetType SoapBarType)
    (canContain CabinetType SoapBottleType)
    (canContain CabinetType SprayBottleType)
    (canContain CabinetType ToiletPaperType)
    (receptacleType Cabinet_bar_2 CabinetType)
    (receptacleAtLocation Cabinet_bar_2 loc_bar_2)
    (openable Cabinet_bar_2)
    (canContain CabinetType CandleType)
    (canContain CabinetType ClothType)
    (canContain CabinetType SoapBarType)
    (canContain CabinetType SoapBottleType)
    (canContain CabinetType SprayBottleType)
    (canContain CabinetType ToiletPaperType)
    (receptacleType CounterTop_bar_1 CounterTopType)
    (receptacleAtLocation CounterTop_bar_1 loc_bar_3)
    (canContain CounterTopType CandleType)
    (canContain CounterTopType ClothType)
    (canContain CounterTopType SoapBarType)
    (canContain CounterTopType SoapBottleType)
    (canContain CounterTopType SprayBottleType)
    (canContain CounterTopType ToiletPaperType)
    (receptacleType Sink_bar_1_bar_SinkBasin SinkBasinType)
    (receptacleAtLocation Sink_bar_1_bar_SinkBasin loc_bar_4)
    (canContain SinkBasinType CandleType)
    (canContain SinkBasinType ClothType)
    (canContain SinkBasinType SoapBarType)
    (canContain SinkBasinType SoapBottleType)
    (canContain SinkBasinType SprayBottleType)
    (canContain SinkBasinType ToiletPaperType)
    (receptacleType Toilet_bar_1 ToiletType)
    (receptacleAtLocation Toilet_bar_1 loc_bar_5)
    (canContain ToiletType CandleType)
    (canContain ToiletType ClothType)
    (canContain ToiletType SoapBarType)
    (canContain ToiletType SoapBottleType)
    (canContain ToiletType SprayBottleType)
    (canContain ToiletType ToiletPaperType)
    (receptacleType GarbageCan_bar_1 GarbageCanType)
    (receptacleAtLocation GarbageCan_bar_1 loc_bar_6)
    (canContain GarbageCanType CandleType)
    (canContain GarbageCanType ClothType)
    (canContain GarbageCanType SoapBarType)
    (canContain GarbageCanType SoapBottleType)
    (canContain GarbageCanType SprayBottleType)
    (canContain GarbageCanType ToiletPaperType)
    (receptacleType Shelf_bar_1 ShelfType)
    (receptacleAtLocation Shelf_bar_1 loc_bar_7)
    (canContain ShelfType CandleType)
    (canContain ShelfType ClothType)
    (canContain ShelfType SoapBarType)
    (canContain ShelfType SoapBottleType)
    (canContain ShelfType SprayBottleType)
    (canContain ShelfType ToiletPaperType)
    (receptacleType Shelf_bar_2 ShelfType)
    (receptacleAtLocation Shelf_bar_2 loc_bar_8)
    (canContain ShelfType CandleType)
    (canContain ShelfType ClothType)
    (canContain ShelfType SoapBarType)
    (canContain ShelfType SoapBottleType)
    (canContain ShelfType SprayBottleType)
    (canContain ShelfType ToiletPaperType)
    (objectType SoapBar_bar_1 SoapBarType)
    (inReceptacle SoapBar_bar_1 Cabinet_bar_2)
    (objectAtLocation SoapBar_bar_1 loc_bar_2)
    (pickupable SoapBar_bar_1)
    (cleanable SoapBar_bar_1)
    (objectType Cloth_bar_1 ClothType)
    (inReceptacle Cloth_bar_1 Cabinet_bar_1)
    (objectAtLocation Cloth_bar_1 loc_bar_1)
    (pickupable Cloth_bar_1)
    (cleanable Cloth_bar_1)
    (objectType SprayBottle_bar_1 SprayBottleType)
    (inReceptacle SprayBottle_bar_1 Toilet_bar_1)
    (objectAtLocation SprayBottle_bar_1 loc_bar_5)
    (pickupable SprayBottle_bar_1)
    (objectType ToiletPaper_bar_1 ToiletPaperType)
    (inReceptacle ToiletPaper_bar_1 Shelf_bar_1)
    (objectAtLocation ToiletPaper_bar_1 loc_bar_7)
    (pickupable ToiletPaper_bar_1)
    (objectType Candle_bar_1 CandleType)
    (inReceptacle Candle_bar_1 CounterTop_bar_1)
    (objectAtLocation Candle_bar_1 loc_bar_3)
    (pickupable Candle_bar_1)
    (objectType SoapBottle_bar_1 SoapBottleType)
    (inReceptacle SoapBottle_bar_1 Shelf_bar_2)
    (objectAtLocation SoapBottle_bar_1 loc_bar_8)
    (pickupable SoapBottle_bar_1)
)
(:goal (and (exists (?r - receptacle) (exists (?o - object) (and
        (inReceptacle ?o ?r) (objectType ?o SoapBarType) (receptacleType ?r ToiletType))))))
)
