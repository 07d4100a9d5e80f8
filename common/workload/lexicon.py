"""The catalog's vocabulary: verticals, categories and the words each category is written in.

Constant data only (tuples, frozen records). Every category gets its own nouns, attribute
values, benefits and use cases, so the reference texts of one category share phrasing that
other categories lack: the property that makes per-category draft pools pay (DARE).
"""

from __future__ import annotations

from dataclasses import dataclass

PRICE_BANDS = ("budget", "mid-range", "premium", "luxury")


@dataclass(slots=True, frozen=True)
class AttributeSpec:
    # Written after its value in item text: value "mesh", label "upper" -> "mesh upper".
    label: str
    values: tuple[str, ...]


@dataclass(slots=True, frozen=True)
class CategorySpec:
    vertical: str
    name: str
    # Plural display name, used in running text ("sneakers", "hotel stays").
    display: str
    # Singular noun phrases an answer may call one item by (synonyms).
    nouns: tuple[str, ...]
    # Last word(s) of item titles ("Trainers" in "Norvik Zephyr 3 Trainers").
    title_nouns: tuple[str, ...]
    attributes: tuple[AttributeSpec, ...]
    benefits: tuple[str, ...]
    uses: tuple[str, ...]
    # Verb of the call to action ("Shop", "Book").
    cta: str

    @property
    def key(self) -> str:
        """The category's pool key, "<vertical>/<category>"."""
        return f"{self.vertical}/{self.name}"


def _cat(vertical, name, display, nouns, title_nouns, attributes, benefits, uses, cta) -> CategorySpec:
    return CategorySpec(
        vertical=vertical,
        name=name,
        display=display,
        nouns=tuple(nouns),
        title_nouns=tuple(title_nouns),
        attributes=tuple(AttributeSpec(label, tuple(values)) for label, values in attributes),
        benefits=tuple(benefits),
        uses=tuple(uses),
        cta=cta,
    )


CATEGORIES: tuple[CategorySpec, ...] = (
    # ---- fashion ----
    _cat("fashion", "sneakers", "sneakers",
         ["pair of sneakers", "trainer", "everyday shoe"], ["Sneakers", "Trainers"],
         [("upper", ["breathable mesh", "full-grain leather", "recycled knit", "soft suede"]),
          ("sole", ["cloud foam", "grippy rubber", "gel-cushioned", "low-profile"]),
          ("colorway", ["triple white", "washed navy", "sand and olive", "jet black"]),
          ("fit", ["true-to-size", "roomy", "snug"])],
         ["all-day comfort", "a springy step", "a clean street look", "cushioning that lasts",
          "easy styling with any outfit", "light feet on long walks"],
         ["city walks", "weekend errands", "casual Fridays", "travel days"], "Shop"),
    _cat("fashion", "dresses", "dresses",
         ["dress", "frock", "statement piece"], ["Dress", "Midi Dress", "Wrap Dress"],
         [("fabric", ["flowing chiffon", "stretch jersey", "linen blend", "silky satin"]),
          ("cut", ["wrap", "A-line", "slip", "shirt"]),
          ("print", ["floral", "polka dot", "solid", "abstract"]),
          ("length", ["mini", "midi", "maxi"])],
         ["an effortless silhouette", "movement that flatters", "breezy comfort in the heat",
          "a look that goes from desk to dinner", "easy elegance", "a polished finish"],
         ["summer weddings", "date nights", "office days", "garden parties"], "Shop"),
    _cat("fashion", "jackets", "jackets", ["jacket", "outer layer", "coat"], ["Jacket", "Parka", "Shell"],
         [("shell", ["waxed cotton", "ripstop nylon", "wool blend", "vegan leather"]),
          ("lining", ["quilted", "fleece", "unlined", "thermal"]),
          ("closure", ["two-way zip", "snap button", "toggle"]),
          ("hood", ["detachable", "fixed", "packable"])],
         ["warmth without bulk", "protection from wind and drizzle", "a sharp layered look",
          "room for a sweater underneath", "pockets for everything", "a shape that holds up"],
         ["cold commutes", "autumn hikes", "weekend trips", "evenings out"], "Shop"),
    _cat("fashion", "handbags", "handbags", ["bag", "handbag", "tote"], ["Tote", "Crossbody", "Shoulder Bag"],
         [("material", ["pebbled leather", "canvas", "nylon", "croc-embossed leather"]),
          ("strap", ["adjustable", "chain", "top-handle", "detachable"]),
          ("size", ["compact", "medium", "oversized"]),
          ("hardware", ["gold-tone", "silver-tone", "matte black"])],
         ["room for the essentials", "a look that elevates any outfit", "hands-free ease",
          "smart pockets that keep order", "lasting craftsmanship", "quiet luxury"],
         ["work days", "brunch dates", "travel", "evening events"], "Shop"),
    _cat("fashion", "watches", "watches",
         ["watch", "timepiece", "wristwatch"], ["Watch", "Chronograph", "Automatic"],
         [("movement", ["quartz", "automatic", "solar"]),
          ("case", ["stainless steel", "titanium", "rose gold", "ceramic"]),
          ("strap", ["leather", "mesh", "rubber", "link bracelet"]),
          ("water resistance", ["50 m", "100 m", "200 m"])],
         ["precision you can trust", "a classic wrist presence", "everyday toughness",
          "a dial that is easy to read", "heirloom appeal", "understated style"],
         ["board meetings", "weekend dives", "formal dinners", "daily wear"], "Shop"),
    # ---- electronics ----
    _cat("electronics", "headphones", "headphones", ["pair of headphones", "headset", "set of cans"],
         ["Headphones", "Earbuds", "Over-Ear"],
         [("noise cancelling", ["adaptive", "hybrid", "passive"]),
          ("battery", ["20-hour", "30-hour", "40-hour", "60-hour"]),
          ("driver", ["40 mm", "50 mm", "planar", "dual"]),
          ("connection", ["Bluetooth 5.3", "multipoint Bluetooth", "wired and wireless"])],
         ["deep, punchy bass", "silence on demand", "crisp calls", "comfort for long sessions",
          "rich detailed sound", "quick pairing"],
         ["long flights", "focused work", "the daily commute", "gym sessions"], "Order"),
    _cat("electronics", "smartphones", "smartphones",
         ["phone", "smartphone", "handset"], ["Phone", "Smartphone"],
         [("display", ["6.1-inch OLED", "6.7-inch AMOLED", "120 Hz LCD"]),
          ("camera", ["triple-lens", "50 MP", "periscope zoom", "dual-lens"]),
          ("storage", ["128 GB", "256 GB", "512 GB"]),
          ("battery", ["4500 mAh", "5000 mAh", "fast-charging"])],
         ["photos that pop", "a battery that lasts the day", "smooth scrolling", "speed for every app",
          "a bright screen outdoors", "security you can rely on"],
         ["mobile gaming", "travel photos", "video calls", "streaming on the go"], "Order"),
    _cat("electronics", "laptops", "laptops",
         ["laptop", "notebook", "machine"], ["Laptop", "Notebook", "Book"],
         [("processor", ["8-core", "12-core", "low-power"]),
          ("memory", ["8 GB", "16 GB", "32 GB"]),
          ("screen", ["13-inch", "14-inch", "16-inch"]),
          ("chassis", ["aluminium", "magnesium", "recycled plastic"])],
         ["power for heavy workloads", "a keyboard you will enjoy", "all-day battery", "silent operation",
          "a light bag", "quick wake from sleep"],
         ["remote work", "coding sprints", "photo editing", "lectures"], "Order"),
    _cat("electronics", "smartwatches", "smartwatches", ["smartwatch", "wearable", "fitness watch"],
         ["Watch", "Band", "Smartwatch"],
         [("sensor", ["heart-rate", "SpO2", "ECG", "skin-temperature"]),
          ("display", ["always-on AMOLED", "transflective", "sapphire-covered"]),
          ("battery", ["2-day", "7-day", "14-day"]),
          ("GPS", ["dual-band", "built-in", "phone-assisted"])],
         ["insight into sleep", "workouts tracked automatically", "notifications at a glance",
          "health data you can act on", "a week between charges", "motivation to move"],
         ["marathon training", "sleep tracking", "busy workdays", "outdoor runs"], "Order"),
    _cat("electronics", "cameras", "cameras",
         ["camera", "shooter", "body"], ["Camera", "Mirrorless", "Compact"],
         [("sensor", ["full-frame", "APS-C", "1-inch"]),
          ("video", ["4K 60p", "6K", "1080p 120p"]),
          ("stabilisation", ["5-axis", "digital", "optical"]),
          ("autofocus", ["eye-tracking", "hybrid", "phase-detect"])],
         ["sharp images in low light", "cinematic video", "steady handheld shots",
          "focus that never misses", "colours straight out of the camera", "a body that travels light"],
         ["street photography", "vlogging", "wildlife trips", "family events"], "Order"),
    # ---- home ----
    _cat("home", "sofas", "sofas", ["sofa", "couch", "settee"], ["Sofa", "Sectional", "Loveseat"],
         [("upholstery", ["boucle", "velvet", "performance linen", "leather"]),
          ("layout", ["two-seat", "three-seat", "corner"]),
          ("frame", ["solid oak", "kiln-dried pine", "steel"]),
          ("cushions", ["feather-wrapped", "high-density foam", "reversible"])],
         ["sink-in comfort", "a living room focal point", "fabric that survives pets",
          "space for movie nights", "support that keeps its shape", "easy assembly"],
         ["movie nights", "family gatherings", "small apartments", "lazy Sundays"], "Shop"),
    _cat("home", "lamps", "lamps", ["lamp", "light", "fixture"], ["Lamp", "Floor Lamp", "Table Lamp"],
         [("shade", ["linen", "frosted glass", "rattan", "metal"]),
          ("bulb", ["warm LED", "dimmable LED", "smart RGB"]),
          ("base", ["brass", "ceramic", "marble", "walnut"]),
          ("switch", ["touch", "foot", "app-controlled"])],
         ["a warm glow", "soft light for reading", "mood on demand", "a sculptural accent",
          "low energy bills", "light exactly where you need it"],
         ["reading corners", "bedside tables", "home offices", "cosy evenings"], "Shop"),
    _cat("home", "cookware", "cookware sets",
         ["pan", "pot", "cookware set"], ["Skillet", "Dutch Oven", "Pan Set"],
         [("body", ["cast iron", "tri-ply stainless", "hard-anodised aluminium", "carbon steel"]),
          ("coating", ["ceramic non-stick", "enamelled", "uncoated", "PFAS-free"]),
          ("design", ["induction-ready", "all-hob", "oven-safe"]),
          ("handle", ["riveted", "stay-cool", "removable"])],
         ["even heating", "easy clean-up", "a perfect sear", "decades of use",
          "eggs that slide right off", "restaurant results at home"],
         ["weeknight dinners", "Sunday roasts", "batch cooking", "breakfast for the family"], "Shop"),
    _cat("home", "bedding", "bedding sets",
         ["duvet set", "sheet set", "bedding set"], ["Sheet Set", "Duvet", "Bedding"],
         [("fabric", ["organic cotton", "washed linen", "bamboo lyocell", "brushed flannel"]),
          ("weave", ["percale", "sateen", "waffle"]),
          ("thread count", ["300", "400", "600"]),
          ("size", ["single", "double", "king"])],
         ["cool nights", "hotel-quality sleep", "softness that improves with washing",
          "breathable comfort", "a crisp made bed", "cosy warmth in winter"],
         ["hot summers", "guest rooms", "lazy weekends", "winter nights"], "Shop"),
    _cat("home", "vacuums", "vacuum cleaners",
         ["vacuum", "cleaner", "hoover"], ["Vacuum", "Stick Vac", "Robot Vac"],
         [("design", ["cordless stick", "robot", "upright", "canister"]),
          ("suction", ["150 AW", "200 AW", "240 AW"]),
          ("runtime", ["40-minute", "60-minute", "90-minute"]),
          ("filter", ["HEPA", "washable", "cyclonic"])],
         ["floors clean in minutes", "strong pickup of pet hair", "allergen-free air",
          "quiet cleaning", "no more cords", "reach under every sofa"],
         ["pet homes", "busy families", "quick tidy-ups", "large apartments"], "Shop"),
    # ---- beauty ----
    _cat("beauty", "skincare", "skincare products", ["serum", "moisturiser", "skincare essential"],
         ["Serum", "Cream", "Gel"],
         [("formula", ["hyaluronic acid", "niacinamide", "vitamin C", "retinol"]),
          ("care", ["dry skin", "oily skin", "combination skin", "sensitive skin"]),
          ("texture", ["lightweight gel", "rich cream", "silky fluid"]),
          ("finish", ["matte", "dewy", "natural"])],
         ["a dewy glow", "plumper-looking skin", "calm, balanced skin", "a smoother texture",
          "hydration that lasts", "visible radiance"],
         ["morning routines", "night-time repair", "dry winter days", "post-sun care"], "Try"),
    _cat("beauty", "fragrance", "fragrances",
         ["fragrance", "scent", "perfume"], ["Eau de Parfum", "Cologne", "Mist"],
         [("accord", ["woody", "floral", "citrus", "amber"]),
          ("top note", ["bergamot", "pink pepper", "pear", "neroli"]),
          ("concentration", ["eau de parfum", "eau de toilette", "extrait"]),
          ("bottle", ["30 ml", "50 ml", "100 ml"])],
         ["a signature trail", "compliments all day", "a scent that lingers", "fresh confidence",
          "an unforgettable first impression", "a gift that feels personal"],
         ["date nights", "office days", "special occasions", "holiday gifting"], "Discover"),
    _cat("beauty", "makeup", "makeup products",
         ["palette", "makeup essential", "beauty staple"], ["Palette", "Lipstick", "Foundation"],
         [("finish", ["matte", "satin", "shimmer", "dewy"]),
          ("range", ["12-shade", "24-shade", "40-shade"]),
          ("wear", ["12-hour", "transfer-proof", "buildable"]),
          ("formula", ["vegan", "talc-free", "long-wear"])],
         ["colour that stays put", "a flawless finish", "easy blending", "bold pigment",
          "a natural-looking base", "looks from day to night"],
         ["everyday looks", "party nights", "photo shoots", "festival season"], "Try"),
    _cat("beauty", "haircare", "haircare products", ["shampoo", "hair treatment", "conditioner"],
         ["Shampoo", "Hair Mask", "Conditioner"],
         [("hair formula", ["curly", "fine", "coloured", "thick"]),
          ("infusion", ["argan oil", "keratin", "biotin", "rice water"]),
          ("wash", ["sulphate-free", "low-lather", "gentle"]),
          ("scent", ["coconut", "green tea", "unscented"])],
         ["frizz under control", "shine you can see", "stronger ends", "volume from the roots",
          "colour that lasts longer", "soft, manageable hair"],
         ["humid days", "post-swim care", "weekly treatments", "quick morning routines"], "Try"),
    _cat("beauty", "shavers", "shavers",
         ["shaver", "trimmer", "grooming tool"], ["Shaver", "Trimmer", "Groomer"],
         [("head", ["rotary", "foil", "single-blade"]),
          ("use", ["wet and dry", "dry only"]),
          ("runtime", ["45-minute", "60-minute", "90-minute"]),
          ("attachments", ["3", "5", "8"])],
         ["a close, comfortable shave", "less irritation", "precise edges", "quick touch-ups",
          "a clean travel kit", "salon results at home"],
         ["morning routines", "business travel", "beard styling", "gym bags"], "Order"),
    # ---- sports ----
    _cat("sports", "bikes", "bikes", ["bike", "bicycle", "ride"], ["Bike", "Roadster", "E-Bike"],
         [("frame", ["carbon", "aluminium", "steel", "titanium"]),
          ("gears", ["single-speed", "11-speed", "hub"]),
          ("brakes", ["hydraulic disc", "rim", "mechanical disc"]),
          ("drive", ["chain", "belt", "250 W e-assist", "500 W e-assist"])],
         ["effortless climbs", "a smooth, fast ride", "confident stopping power", "fewer car trips",
          "comfort on long rides", "a bike that turns heads"],
         ["commuting", "weekend rides", "gravel adventures", "fitness training"], "Ride"),
    _cat("sports", "tents", "tents", ["tent", "shelter", "camp"], ["Tent", "Dome", "Shelter"],
         [("capacity", ["1-person", "2-person", "4-person", "6-person"]),
          ("rating", ["3-season", "4-season"]),
          ("poles", ["aluminium", "fibreglass", "carbon"]),
          ("weight", ["1.2 kg", "2.5 kg", "4 kg"])],
         ["a dry night in a storm", "set-up in minutes", "room to stretch out", "a light pack",
          "ventilation without condensation", "shelter you can trust"],
         ["festival weekends", "backcountry treks", "family camping", "bike touring"], "Gear up with"),
    _cat("sports", "yoga_mats", "yoga mats",
         ["yoga mat", "mat", "practice mat"], ["Yoga Mat", "Mat", "Travel Mat"],
         [("surface", ["natural rubber", "cork", "TPE", "PVC-free foam"]),
          ("thickness", ["3 mm", "5 mm", "6 mm"]),
          ("texture", ["wet-grip", "ridged", "sticky"]),
          ("finish", ["alignment-line", "matte", "two-tone"])],
         ["a grip that holds in hot yoga", "joint-friendly cushioning", "steady balance poses",
          "an easy roll-up", "a calm practice space", "a surface that wipes clean"],
         ["hot yoga", "home workouts", "pilates classes", "morning stretches"], "Roll out"),
    _cat("sports", "dumbbells", "dumbbells",
         ["set of dumbbells", "weight set", "dumbbell"], ["Dumbbells", "Weight Set"],
         [("design", ["adjustable", "hex", "fixed"]),
          ("range", ["2-24 kg", "5-40 kg", "1-10 kg"]),
          ("coating", ["rubber", "neoprene", "chrome"]),
          ("handle", ["knurled", "contoured", "foam"])],
         ["a full gym in a corner", "strength gains at home", "quick weight changes",
          "floors kept safe", "a secure grip", "progress you can measure"],
         ["home gyms", "strength training", "rehab routines", "small spaces"], "Order"),
    _cat("sports", "backpacks", "backpacks",
         ["backpack", "pack", "daypack"], ["Backpack", "Daypack", "Rucksack"],
         [("capacity", ["20 L", "30 L", "45 L"]),
          ("fabric", ["waterproof nylon", "recycled polyester", "waxed canvas"]),
          ("back system", ["ventilated mesh", "padded", "frameless"]),
          ("laptop sleeve", ["15-inch", "16-inch", "padded"])],
         ["comfort under load", "dry gear in the rain", "organised pockets", "a pack for every trip",
          "carry-on friendly size", "weight spread evenly"],
         ["day hikes", "campus days", "weekend getaways", "cycling commutes"], "Grab"),
    # ---- travel ----
    _cat("travel", "hotels", "hotel stays", ["hotel", "stay", "getaway"], ["Hotel", "Resort", "Suites"],
         [("location", ["beachfront", "old-town", "city-centre", "mountain"]),
          ("rooms", ["sea-view", "family", "loft", "garden"]),
          ("breakfast", ["free", "buffet", "continental"]),
          ("access", ["rooftop pool", "spa", "beach club", "gym"])],
         ["a restful escape", "everything within walking distance", "views you will remember",
          "service that feels personal", "a base for exploring", "easy family trips"],
         ["city breaks", "honeymoons", "family holidays", "business trips"], "Book"),
    _cat("travel", "flights", "flights", ["flight", "fare", "route"], ["Airlines", "Airways", "Flights"],
         [("cabin", ["economy", "premium economy", "business"]),
          ("routing", ["nonstop", "one-stop", "overnight"]),
          ("baggage", ["carry-on", "checked", "extra"]),
          ("ticket", ["flexible", "changeable", "saver"])],
         ["more time at your destination", "a smooth journey", "fares that fit the budget",
          "extra legroom", "stress-free changes", "arrival rested and ready"],
         ["long weekends", "visiting family", "business travel", "last-minute escapes"], "Book"),
    _cat("travel", "car_rentals", "car rentals",
         ["rental car", "car hire", "set of wheels"], ["Rentals", "Car Hire", "Drive"],
         [("class", ["compact", "SUV", "convertible", "electric"]),
          ("transmission", ["automatic", "manual"]),
          ("mileage", ["unlimited", "capped"]),
          ("pickup", ["airport", "downtown", "station"])],
         ["freedom to explore", "room for the whole crew", "a drive along the coast",
          "no waiting at the counter", "clear pricing", "a smooth road trip"],
         ["road trips", "island hopping", "airport transfers", "family holidays"], "Reserve"),
    _cat("travel", "cruises", "cruises", ["cruise", "voyage", "sailing"], ["Cruise", "Voyage", "Sailing"],
         [("route", ["Mediterranean", "Caribbean", "Norwegian fjords", "Alaskan"]),
          ("itinerary", ["4-night", "7-night", "14-night"]),
          ("cabin", ["balcony", "oceanview", "inside", "suite"]),
          ("package", ["all-inclusive", "drinks", "dining"])],
         ["several ports in one trip", "unpacking only once", "sunsets at sea",
          "entertainment every night", "dining without planning", "a relaxed pace"],
         ["anniversaries", "family reunions", "first cruises", "winter sun"], "Sail with"),
    _cat("travel", "tours", "tours", ["tour", "guided trip", "experience"], ["Tours", "Tour", "Excursions"],
         [("format", ["small-group", "private", "self-guided"]),
          ("schedule", ["half-day", "full-day", "multi-day"]),
          ("theme", ["food", "history", "wildlife", "architecture"]),
          ("commentary", ["English", "multilingual"])],
         ["local stories you would miss alone", "skip-the-line access", "a guide who knows every corner",
          "new friends along the way", "a day planned for you", "memories that last"],
         ["first visits", "solo travel", "rainy days", "family outings"], "Book"),
    # ---- grocery ----
    _cat("grocery", "coffee", "coffee blends", ["coffee", "roast", "blend"], ["Coffee", "Espresso", "Roast"],
         [("roast", ["light", "medium", "dark"]),
          ("origin", ["Ethiopian", "Colombian", "Sumatran", "Brazilian"]),
          ("grind", ["whole bean", "espresso", "filter"]),
          ("notes", ["chocolate", "berry", "caramel", "citrus"])],
         ["a smooth morning cup", "rich crema", "bright, lively flavour", "a bold wake-up call",
          "beans roasted to order", "cafe quality at home"],
         ["morning rituals", "espresso machines", "office breaks", "slow weekends"], "Order"),
    _cat("grocery", "tea", "teas", ["tea", "infusion", "blend"], ["Tea", "Chai", "Infusion"],
         [("tea", ["green", "black", "oolong", "herbal"]),
          ("format", ["loose leaf", "pyramid bags", "matcha powder"]),
          ("origin", ["Darjeeling", "Yunnan", "Kyoto", "Assam"]),
          ("blend", ["caffeine-free", "decaf", "classic"])],
         ["a calm afternoon", "a gentle lift", "layered, fragrant flavour", "a soothing ritual",
          "antioxidants in every cup", "a cup that never turns bitter"],
         ["afternoon breaks", "evening wind-downs", "hosting friends", "focused study"], "Order"),
    _cat("grocery", "snacks", "snacks", ["snack", "treat", "bite"], ["Crisps", "Bars", "Bites"],
         [("flavour", ["sea salt", "smoky paprika", "dark chocolate", "honey almond"]),
          ("recipe", ["vegan", "gluten-free", "high-protein", "keto"]),
          ("pack", ["single-serve", "family-size", "multipack"]),
          ("base", ["oat", "nut", "corn", "lentil"])],
         ["guilt-free crunch", "energy between meals", "a lunchbox win", "real ingredients",
          "flavour that satisfies", "a treat for movie night"],
         ["lunchboxes", "afternoon slumps", "road trips", "post-workout fuel"], "Grab"),
    _cat("grocery", "wine", "wines", ["wine", "bottle", "vintage"], ["Reserve", "Estate", "Cuvee"],
         [("wine", ["red", "white", "rose", "sparkling"]),
          ("grape", ["pinot noir", "chardonnay", "tempranillo", "sauvignon blanc"]),
          ("region", ["Rioja", "Burgundy", "Napa", "Marlborough"]),
          ("vintage", ["2019", "2020", "2021", "2022"])],
         ["a bottle worth sharing", "a perfect food pairing", "smooth tannins", "crisp refreshment",
          "a wine to cellar", "celebration in a glass"],
         ["dinner parties", "barbecues", "gifting", "quiet evenings"], "Order"),
    _cat("grocery", "meal_kits", "meal kits",
         ["meal kit", "dinner box", "recipe kit"], ["Kit", "Box", "Meal Box"],
         [("box", ["2-serving", "4-serving", "family-size"]),
          ("menu", ["vegetarian", "high-protein", "low-carb", "balanced"]),
          ("prep time", ["15-minute", "30-minute", "45-minute"]),
          ("delivery", ["weekly", "fortnightly", "flexible"])],
         ["dinner sorted without shopping", "less food waste", "new recipes every week",
          "portions that fit", "chef-designed flavour", "cooking that feels fun"],
         ["busy weeknights", "learning to cook", "healthy eating", "date-night dinners"], "Order"),
)

VERTICALS: tuple[str, ...] = tuple(dict.fromkeys(spec.vertical for spec in CATEGORIES))

# Who a vertical's items are aimed at (an item's `audience`).
AUDIENCES: dict[str, tuple[str, ...]] = {
    "fashion": ("young professionals", "students", "trend followers", "busy parents", "classic dressers"),
    "electronics": ("gamers", "remote workers", "students", "creators", "frequent travelers"),
    "home": ("new homeowners", "renters", "busy families", "home cooks", "design lovers"),
    "beauty": ("skincare beginners", "beauty enthusiasts", "busy professionals", "gift buyers", "men"),
    "sports": ("weekend warriors", "commuters", "beginners", "seasoned athletes", "families"),
    "travel": ("couples", "families", "solo travelers", "business travelers", "retirees"),
    "grocery": ("foodies", "busy parents", "health-conscious eaters", "students", "hosts"),
}

# What a user-summary answer calls the person, per vertical.
PERSON_NOUNS: dict[str, tuple[str, ...]] = {
    "fashion": ("shopper", "style seeker", "customer"),
    "electronics": ("shopper", "tech buyer", "gadget fan"),
    "home": ("shopper", "homemaker", "customer"),
    "beauty": ("shopper", "beauty buyer", "customer"),
    "sports": ("shopper", "athlete", "customer"),
    "travel": ("traveler", "guest", "customer"),
    "grocery": ("shopper", "food lover", "customer"),
}

# Words for title models; titles read "<brand> <model word>[ suffix] <title noun>".
MODEL_WORDS = (
    "Aero", "Nova", "Pulse", "Terra", "Echo", "Flux", "Zen", "Arc", "Vista", "Luna", "Orbit", "Crest",
    "Drift", "Edge", "Peak", "Halo", "Ion", "Jet", "Core", "Swift", "Wave", "Ember", "Frost", "Glide",
    "Haven", "Ridge", "Sky", "Stone", "Tide", "Volt", "Bloom", "Coast", "Dune", "Fable", "Grove",
    "Harbor", "Iris", "Jade", "Koda", "Lark", "Maple", "Nimbus", "Onyx", "Pine", "Quill", "Rune",
    "Sable", "Tempo", "Umber", "Vale",
)
MODEL_SUFFIXES = ("", "", "", " 2", " 3", " Pro", " Max", " Lite", " X", " Plus", " Mini", " Air")

# Syllables brand names are made of (two or three per name).
BRAND_SYLLABLES = (
    "nor", "vik", "al", "ter", "lu", "men", "zen", "ko", "ra", "vo", "sta", "mi", "bel", "quin",
    "dar", "fen", "lo", "tri", "vex", "sol", "mar", "kai", "ris", "on", "ta", "ver", "del", "cor",
)


def category_by_key(key: str) -> CategorySpec:
    """The category spec of a pool key "<vertical>/<category>"; KeyError when unknown."""
    for spec in CATEGORIES:
        if spec.key == key:
            return spec
    raise KeyError(f"unknown category key {key!r}")
