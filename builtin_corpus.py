"""A seeded generator of a small fictional encyclopedia with questions, so the pipeline runs without a download.

Every entity (person, town, river, mountain, company, guild, order, book, opera, painting) has an invented,
unique name and random facts; each document states some of them with varied templates and filler prose, and
every stated fact yields one QAPair whose canonical answer is a verbatim span of that document. Because the
facts are random, a held-out question can only be answered by reading the right document.

Output depends only on (num_documents, seed): one local `random.Random`, no str hashing, no set iteration.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

from metrics import normalize_answer
from records import Document, QAPair

# Share of documents per kind; the order is also the order of documents in the output.
KIND_WEIGHTS = (
    ("person", 0.32),
    ("town", 0.15),
    ("river", 0.05),
    ("mountain", 0.05),
    ("company", 0.07),
    ("guild", 0.05),
    ("order", 0.04),
    ("book", 0.11),
    ("opera", 0.06),
    ("painting", 0.10),
)
ORG_KINDS = ("company", "guild", "order")
WORK_KINDS = ("book", "opera", "painting")
MIN_WORDS = 30
# Bump whenever the output for a given (num_documents, seed) changes, so caches keyed on it are rebuilt.
# 2: a teacher is alive when the pupil is 15 (a third of them had died before).
# 3: births, organisations and works come after the founding of their town; no two titles are equal once normalised
#    ("The Scarlet Chalice" and "Scarlet Chalice"); a person's other organisations and works of the asked kind are
#    accepted answers too; guilds and orders keep their kind's name when the titles run out.
VERSION = 3
# Generation takes ~0.16 ms a document and invents names from a finite stock of syllables, which a corpus far
# larger would exhaust (the namer would then search forever): 200,000 documents took 32 s on machine A.
MAX_DOCUMENTS = 200_000

# ---------------------------------------------------------------------------------------------------------------
# Name material. Syllables are onset + vowel (+ coda); every invented root is used once in a corpus.
# ---------------------------------------------------------------------------------------------------------------
ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "th", "tr",
          "v", "w", "z", "c", "sh")
SIMPLE_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z")
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou", "ea")
MID_CODAS = ("", "", "", "n", "r", "l", "s", "m")
FINAL_CODAS = ("n", "r", "l", "s", "m", "nd", "rn", "rd", "st", "th", "x", "k")
GIVEN_ENDINGS = ("in", "a", "en", "is", "el", "o", "an", "ric", "wen", "ara", "ice", "on", "eth", "ia", "ard")
SURNAME_ENDINGS = ("mere", "wick", "dale", "ford", "holt", "more", "ton", "by", "well", "stone", "field", "ward",
                   "croft", "ley", "brook", "hurst", "worth", "gard")
TOWN_ENDINGS = ("", "", "", "ham", "bury", "stead", "wick", "mouth", "gate", "haven", "moor", "thorpe", "ford")
RIVER_ENDINGS = ("a", "e", "ra", "na", "wen", "ith", "el", "ora", "is")
REGION_ENDINGS = ("march", "reach", "vale", "shire", "land", "mark", "fell", "dene", "mere")
ADJECTIVES = ("Quiet", "Silver", "Hollow", "Crimson", "Last", "Amber", "Broken", "Golden", "Winter", "Distant",
              "Patient", "Burning", "Sleeping", "Iron", "Hidden", "Seventh", "Pale", "Restless", "Glass",
              "Forgotten", "Northern", "Velvet", "Bitter", "Wandering", "Lonely", "Copper", "Shining", "Green",
              "Salt", "Crooked", "Gentle", "Scarlet", "Narrow", "Evening", "Drowned", "Laughing", "Ashen",
              "Stone", "Faithful", "Twelfth")
NOUNS = ("Lantern", "Key", "Harbour", "Orchard", "Crown", "Bridge", "Garden", "Mirror", "Tower", "Compass",
         "Thread", "Feather", "Bell", "Door", "Harvest", "Anchor", "Candle", "Fox", "Heron", "Wheel", "Oath",
         "Meadow", "Chalice", "Storm", "Well", "Sparrow", "Shepherd", "Map", "Rose", "Loom", "Ember", "Voyage",
         "Stair", "Falcon", "Hearth", "Tide", "Ledger", "Pilgrim", "Cloak", "Vine")

OCCUPATIONS = ("cartographer", "astronomer", "glassblower", "shipwright", "physician", "apothecary", "poet",
               "composer", "painter", "sculptor", "merchant", "banker", "engineer", "botanist", "architect",
               "clockmaker", "printer", "bookbinder", "surveyor", "magistrate", "admiral", "diplomat", "historian",
               "philosopher", "mathematician", "alchemist", "weaver", "jeweller", "explorer", "translator",
               "schoolmaster", "lawyer", "brewer", "organ builder", "mapmaker", "naturalist", "chemist",
               "playwright", "violinist", "instrument maker", "stonemason", "harbour master", "abbess",
               "lexicographer", "calligrapher")
FIELDS = ("glassmaking", "shipbuilding", "cartography", "banking", "maritime insurance", "bookbinding",
          "clockmaking", "salt mining", "wool trading", "printing", "brewing", "silk weaving", "bell founding",
          "astronomy", "medicine", "river transport", "map engraving", "herbal medicine", "lens grinding",
          "stonemasonry", "the spice trade", "paper making", "dye making", "timber trading", "coal mining",
          "lace making", "organ building", "horse breeding", "tea importing", "copper smelting",
          "the teaching of music", "the care of the sick", "the copying of manuscripts", "road building",
          "pottery", "perfume making", "rope making", "wine growing", "leather tanning", "canal building")
GENRES = {
    "book": ("historical novel", "picaresque novel", "epistolary novel", "verse romance", "travel memoir",
             "book of sermons", "treatise on navigation", "collection of fables", "satirical novel",
             "pastoral poem", "epic poem", "chronicle", "book of essays", "ghost story", "comedy of manners",
             "cookery book", "herbal", "book of riddles", "detective novel", "family saga"),
    "opera": ("comic opera", "tragic opera", "pastoral opera", "opera seria", "operetta", "chamber opera",
              "sacred opera", "heroic opera", "fairy opera", "romantic opera", "opera buffa", "ballad opera",
              "grand opera", "one-act opera"),
    "painting": ("landscape", "portrait", "still life", "seascape", "allegorical painting", "altarpiece",
                 "genre scene", "history painting", "miniature", "triptych", "night scene", "pastoral scene",
                 "hunting scene", "interior view"),
}
WORK_VERBS = {  # kind -> (past tense, participle of creation, participle of first appearance, role noun)
    "book": ("wrote", "written", "published", "author"),
    "opera": ("composed", "composed", "first performed", "composer"),
    "painting": ("painted", "painted", "completed", "painter"),
}

# ---------------------------------------------------------------------------------------------------------------
# Fact templates: key -> (statement templates, question templates). {S} is the entity as written in the
# document, {a} the answer span, {aa} the answer with "a"/"an", {m} the answer as mentioned mid-sentence
# (it contains {a}), {n} the entity's name in a question. Work templates also use {k} {v} {vp} {vy} {role}.
# ---------------------------------------------------------------------------------------------------------------
FACTS = {
    "occupation": (
        ("{S} was {aa}.", "{S} was {aa} by trade.", "{S} worked for most of a long life as {aa}.",
         "{S} is remembered chiefly as {aa}.", "{S} was {aa} of some renown in the region."),
        ("What was the occupation of {n}?", "What did {n} do for a living?", "What was {n}'s profession?",
         "{n} worked as what?"),
    ),
    "birth_year": (
        ("{S} was born in {a}.", "{S} was born in the year {a}.",
         "The parish records give {a} as the year in which {S} was born.", "{S} came into the world in {a}."),
        ("In which year was {n} born?", "When was {n} born?", "What year was {n} born in?",
         "{n} was born in what year?"),
    ),
    "birthplace": (
        ("{S} was born in the town of {a}.", "{a} was the birthplace of {S}.", "{S} was a native of {a}.",
         "{S} was born and raised in {a}."),
        ("Where was {n} born?", "In which town was {n} born?", "What is the birthplace of {n}?",
         "{n} was a native of which town?"),
    ),
    "death_year": (
        ("{S} died in {a}.", "{S} died in the year {a}.", "The death of {S} came in {a}.",
         "{S} passed away in {a}."),
        ("In which year did {n} die?", "When did {n} die?", "What year did {n} die in?",
         "{n} died in which year?"),
    ),
    "teacher": (
        ("{S} studied under {a}.", "{S} was a pupil of {a}.", "As a young apprentice, {S} was taught by {a}.",
         "{a} was the teacher of {S}."),
        ("Who was the teacher of {n}?", "Under whom did {n} study?", "Who taught {n}?",
         "{n} was a pupil of whom?"),
    ),
    "founded": (
        ("{S} founded {m}.", "{S} was the founder of {m}.", "In later life {S} established {m}.",
         "It was {S} who founded {m}."),
        ("Which organisation did {n} found?", "What did {n} found?", "{n} was the founder of which organisation?",
         "Which organisation was established by {n}?"),
    ),
    "created": (
        ("{S} {v} {m}.", "{S} is best known for the {k} {m}.", "Among the works of {S} is the {k} {m}.",
         "{m} was {vp} by {S}."),
        ("Which {k} did {n} {vinf}?", "What {k} is {n} known for?", "Name a {k} by {n}.",
         "Which {k} was {vp} by {n}?"),
    ),
    "town_region": (
        ("{S} is a town in {a}.", "{S} is a market town in the region of {a}.", "{S} is a small town in {a}.",
         "{S} is one of the older towns of {a}."),
        ("In which region is {n}?", "Which region is {n} in?", "{n} is a town in which region?",
         "In which region does the town of {n} lie?"),
    ),
    "town_founded": (
        ("{S} was founded in {a}.", "{S} received its first charter in {a}.",
         "The town of {S} dates its founding to {a}.", "Settlers founded {S} in {a}."),
        ("When was {n} founded?", "In which year was {n} founded?", "What year was the town of {n} founded?",
         "{n} was founded in which year?"),
    ),
    "river": (
        ("{S} lies on {m}.", "{S} stands on the banks of {m}.", "{m} flows through {S}.",
         "{S} grew up around an old crossing of {m}."),
        ("Which river does {n} lie on?", "On which river does {n} stand?", "What river flows through {n}?",
         "{n} lies on which river?"),
    ),
    "population": (
        ("{S} has a population of about {a}.", "Some {a} people live in {S}.",
         "At the last count {S} had {a} inhabitants.", "{S} is home to roughly {a} people."),
        ("What is the population of {n}?", "How many people live in {n}?", "How many inhabitants does {n} have?",
         "About how many people live in {n}?"),
    ),
    "mountain": (
        ("{S} lies in the shadow of {m}.", "{m} rises above {S}.", "From {S} one can see {m}.",
         "The town of {S} is overlooked by {m}."),
        ("Which mountain rises above {n}?", "Which mountain overlooks {n}?",
         "In the shadow of which mountain does {n} lie?"),
    ),
    "river_region": (
        ("{S} is a river in {a}.", "{S} is a river that runs through {a}.", "{S} waters the plains of {a}.",
         "{S} is one of the rivers of {a}."),
        ("In which region does {n} flow?", "Which region does {n} run through?", "{n} is a river in which region?"),
    ),
    "length": (
        ("{S} is {a} long.", "{S} runs for {a}.", "The course of {S} measures {a}.",
         "From source to mouth {S} covers {a}."),
        ("How long is {n}?", "What is the length of {n}?", "How many kilometres long is {n}?"),
    ),
    "source": (
        ("{S} rises on the slopes of {m}.", "The source of {S} lies on {m}.", "{S} has its source on {m}.",
         "The springs that feed {S} lie high on {m}."),
        ("Where does {n} rise?", "On which mountain does {n} have its source?", "Where is the source of {n}?"),
    ),
    "mouth": (
        ("{S} flows into {m}.", "{S} empties into {m}.", "{S} reaches {m} after a long course.",
         "At its mouth {S} meets {m}."),
        ("Into which sea does {n} flow?", "Where does {n} empty?", "Which sea does {n} flow into?"),
    ),
    "mountain_region": (
        ("{S} is a mountain in {a}.", "{S} is a mountain in the ranges of {a}.", "{S} stands in {a}.",
         "{S} is among the mountains of {a}."),
        ("In which region is {n}?", "Which region is {n} in?", "{n} is a mountain in which region?"),
    ),
    "height": (
        ("{S} is {a} high.", "{S} rises to {a}.", "The summit of {S} stands at {a} above the sea.",
         "{S} reaches a height of {a}."),
        ("How high is {n}?", "What is the height of {n}?", "How tall is {n}?"),
    ),
    "first_climber": (
        ("{S} was first climbed by {a}.", "{a} made the first ascent of {S}.",
         "The first recorded ascent of {S} was made by {a}.", "{a} was the first to stand on the summit of {S}."),
        ("Who first climbed {n}?", "Who made the first ascent of {n}?", "Who was the first to climb {n}?"),
    ),
    "first_ascent": (
        ("{S} was first climbed in {a}.", "The first ascent of {S} took place in {a}.",
         "Nobody reached the top of {S} until {a}."),
        ("When was {n} first climbed?", "In which year was {n} first climbed?",
         "In what year was the first ascent of {n}?"),
    ),
    "field": (
        ("{S} is {k_a} concerned with {a}.", "{S} is {k_a} whose work is {a}.", "{S} is {k_a} devoted to {a}.",
         "{S} is {k_a} known for its work in {a}."),
        ("What field is {n} concerned with?", "What is the field of {n}?", "What is the main work of {n}?",
         "In which trade is {n} active?"),
    ),
    "org_founded": (
        ("{S} was founded in {a}.", "{S} was established in {a}.",
         "The history of {S} begins in {a}, the year of its founding.", "{S} came into being in {a}."),
        ("When was {n} founded?", "In which year was {n} established?", "What year was {n} founded in?"),
    ),
    "founder": (
        ("{S} was founded by {a}.", "{a} founded {S}.", "The founder of {S} was {a}.",
         "{S} owes its existence to {a}, who founded it."),
        ("Who founded {n}?", "Who was the founder of {n}?", "By whom was {n} founded?"),
    ),
    "headquarters": (
        ("{S} has its headquarters in {a}.", "{S} is based in {a}.", "The seat of {S} is in {a}.",
         "{S} keeps its main house in {a}."),
        ("Where is {n} based?", "Where are the headquarters of {n}?", "In which town is {n} based?"),
    ),
    "genre": (
        ("{S} is {aa}.", "{S} is {aa} in the old manner.", "{S} is usually described as {aa}.",
         "Critics count {S} as {aa}."),
        ("What kind of work is {n}?", "What genre is {n}?", "{n} is what kind of work?"),
    ),
    "creator": (
        ("{S} was {vp} by {a}.", "{a} {v} {S}.", "{S} is the work of {a}.", "The {role} of {S} was {a}."),
        ("Who {v} {n}?", "Who is the {role} of {n}?", "By whom was {n} {vp}?"),
    ),
    "work_year": (
        ("{S} was {vy} in {a}.", "{S} dates from {a}.", "{S} was {vy} in the year {a}.",
         "{S} first reached the public in {a}."),
        ("When was {n} {vy}?", "In which year was {n} {vy}?", "What year does {n} date from?"),
    ),
    "setting": (
        ("{S} is set in {a}.", "The story of {S} takes place in {a}.", "{S} is set in the town of {a}."),
        ("Where is {n} set?", "In which town is {n} set?", "Which town is the setting of {n}?"),
    ),
    "depicts": (
        ("{S} depicts {a}.", "{S} shows a view of {a}.", "The scene of {S} is the town of {a}."),
        ("Which town does {n} depict?", "What town is shown in {n}?", "Which town is depicted in {n}?"),
    ),
}
INTRO_FACT = {"person": "occupation", "town": "town_region", "river": "river_region",
              "mountain": "mountain_region", "company": "field", "guild": "field", "order": "field",
              "book": "genre", "opera": "genre", "painting": "genre"}

# Filler prose states nothing that could be asked about: no years, no numbers, no other entities.
FILLERS_COMMON = (
    "{S} is mentioned in several old chronicles.", "Scholars still debate the importance of {S}.",
    "Many stories are told about {S}, not all of them true.", "The name of {S} appears in {a_adj} old ledger.",
    "Accounts of {S} differ on many small points.", "Travellers' diaries speak of {S} with {feeling}.",
    "A short history of {S} was once printed for local readers.",
    "The archives hold {a_adj} bundle of papers concerning {S}.",
)
FILLERS = {
    "person": (
        "Little is known of the early life of {S}.", "Contemporaries described {S} as {trait} and {trait2}.",
        "{S} kept {a_adj} {object} on the desk for many years.", "A portrait of {S} hangs in a private house.",
        "{S} travelled widely and was fond of {pastime}.", "In old age {S} spent long hours {pastime}.",
        "The papers of {S} were later scattered among several families.",
        "{S} corresponded with many scholars of the day.", "Friends recalled that {S} {habit}.",
        "It is said that {S} {habit}.", "{S} was known to neighbours as {trait2} but kind.",
        "Several letters written by {S} survive.", "The household of {S} was always full of visitors.",
        "{S} never lost a fondness for {pastime}.", "{a_adj} {object} that once belonged to {S} is still shown.",
    ),
    "town": (
        "The streets of {S} are narrow and {street}.", "{S} holds {a_adj} fair every {season}.",
        "Travellers often mention the {adj} {building} of {S}.",
        "Much of the old quarter of {S} was rebuilt after a fire.",
        "The people of {S} are known for their {trait} manners.", "A market is held in {S} every {weekday}.",
        "The {building} of {S} is its best known sight.", "In {season} the squares of {S} fill with traders.",
        "The inns of {S} are praised for their {food}.", "Local tradition says {S} was once larger.",
        "{S} is known in the region for its {food}.", "{a_adj} {building} stands at the centre of {S}.",
    ),
    "river": (
        "The waters of {S} run {water} in {season}.", "Fishermen along {S} catch {fish}.",
        "Several old bridges cross {S}.", "In {season} {S} often floods its lower meadows.",
        "Mills once stood along the banks of {S}.", "Barges still carry goods down {S}.",
        "Poets have compared {S} to {a_adj} {object}.", "Willows line long stretches of {S}.",
        "The valley of {S} is known for its {food}.", "Herons nest among the reeds of {S}.",
        "Boatmen on {S} sing old songs about {a_adj} {object}.",
    ),
    "mountain": (
        "The slopes of {S} are covered with {plant}.", "Shepherds graze their flocks on the lower slopes of {S}.",
        "Snow lies on the summit of {S} for much of the year.", "{a_adj} chapel stands near the top of {S}.",
        "In {season} storms often hide the summit of {S}.", "Old paths wind up the flanks of {S}.",
        "Climbers describe the rock of {S} as {rock}.", "Legends place {a_adj} {object} inside {S}.",
        "Eagles nest on the cliffs of {S}.", "The valleys below {S} are known for their {food}.",
        "From the summit of {S} the view reaches far on a clear day.",
    ),
    "org": (
        "The records of {S} fill many {adj} volumes.", "Members of {S} meet once a year in a great hall.",
        "{S} has weathered many hard years.", "The emblem of {S} is {a_adj} {object}.",
        "{S} keeps a small library for its members.", "New members of {S} swear {a_adj} oath.",
        "{S} was known for its {rules} rules.", "The hall of {S} is decorated with {a_adj} {object}.",
        "Rivals of {S} called its members {trait}.", "{S} gives a feast for its members every {season}.",
        "Apprentices of {S} wear {a_adj} badge.",
    ),
    "work": (
        "Critics have praised the {adj} mood of {S}.", "{S} was little noticed at first.",
        "Several early copies of {S} survive.", "The opening of {S} is often quoted.",
        "Some readers find {S} {mood}.", "{S} returns again and again to the image of {a_adj} {object}.",
        "Scholars have written much about the meaning of {S}.", "{S} was admired by later artists.",
        "The mood of {S} has been called {mood}.", "{a_adj} {object} plays a part in {S}.",
        "{S} divided critics when it first appeared.", "Many imitations of {S} followed.",
    ),
}
FILL_WORDS = {
    "adj": ("weathered", "curious", "handsome", "faded", "modest", "splendid", "famous", "crowded", "ancient",
            "plain", "elegant", "battered", "colourful", "sombre", "remarkable"),
    "feeling": ("affection", "admiration", "some unease", "warmth", "wonder", "mild amusement"),
    "trait": ("stubborn", "cheerful", "quiet", "proud", "restless", "careful", "generous", "gloomy", "lively",
              "shrewd", "solemn", "kindly"),
    "object": ("brass compass", "silver cup", "painted box", "wooden bird", "glass globe", "carved chair",
               "old clock", "leather map case", "blue lamp", "iron key"),
    "pastime": ("chess", "long walks", "gardening", "fishing", "music", "collecting old coins", "riddles",
                "bird watching", "reading aloud"),
    "habit": ("rose before dawn", "never travelled without a notebook", "disliked loud music",
              "collected old maps", "kept bees", "walked for hours each evening", "wrote with green ink",
              "refused to ride a horse", "slept with the window open"),
    "building": ("town hall", "bell tower", "covered market", "stone bridge", "old mill", "guild hall",
                 "harbour wall", "cathedral", "library"),
    "season": ("spring", "summer", "autumn", "winter"),
    "weekday": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"),
    "food": ("smoked fish", "honey cakes", "cheeses", "dark bread", "plum wine", "pies", "apples"),
    "fish": ("trout", "pike", "eels", "perch", "salmon", "carp"),
    "plant": ("pine forest", "heather", "juniper", "beech woods", "alpine flowers", "thick moss"),
    "trait2": ("witty", "secretive", "patient", "quarrelsome", "devout", "curious"),
    "street": ("winding", "steep", "cobbled", "quiet", "busy", "shaded"),
    "water": ("clear", "muddy", "swift", "slow", "cold", "high"),
    "rock": ("loose", "sound", "treacherous", "sharp", "smooth"),
    "mood": ("gloomy", "solemn", "lively", "tender", "strange", "bleak", "playful"),
    "rules": ("strict", "curious", "ancient", "secret", "generous"),
}


@dataclass
class _Entity:
    """One fictional entity: `name` is the answer span, `mention` how prose refers to it mid-sentence."""

    kind: str
    id: str
    name: str
    mention: str
    aliases: list[str]
    short: str = ""  # a person's surname, used in later sentences
    facts: dict = field(default_factory=dict)  # key -> _Entity | str | int


class _Namer:
    """Invents pronounceable words, never the same root twice."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()  # membership only; never iterated, so its order cannot leak
        self.titles: set[str] = set()  # normalised: "The Scarlet Chalice" and "Scarlet Chalice" are one answer

    def _syllables(self, count: int, ending: str) -> str:
        rng = self.rng
        out, coda = [], ""
        for i in range(count):
            onset = rng.choice(SIMPLE_ONSETS if coda else ONSETS)
            if i == 0 and rng.random() < 0.15:
                onset = ""  # a few names start with a vowel ("Ostrevan")
            if i < count - 1:
                coda = rng.choice(MID_CODAS)
            elif ending:  # avoid vowel clashes and consonant pile-ups where the ending joins on
                coda = rng.choice(FINAL_CODAS[:5]) if ending[0] in "aeiou" else ""
            else:
                coda = rng.choice(FINAL_CODAS) if rng.random() < 0.6 else ""
            out.append(onset + rng.choice(VOWELS) + coda)
        return "".join(out)

    def root(self, endings: tuple[str, ...] = ("",), syllables: tuple[int, ...] = (1, 2)) -> str:
        """A new capitalised word: some syllables plus one of `endings`."""
        while True:
            ending = self.rng.choice(endings)
            word = (self._syllables(self.rng.choice(syllables), ending) + ending).capitalize()
            if 4 <= len(word) <= 12 and word not in self.used:
                self.used.add(word)
                return word

    def phrase(self, makers: tuple, fallback=None) -> str:
        """A new title from a random one of `makers` ("The Quiet Lantern"), new once normalised; when they run out,
        `fallback` (a function of an invented word; default "The <word>")."""
        for _ in range(50):
            text = self.rng.choice(makers)()
            if (key := normalize_answer(text)) not in self.titles:
                self.titles.add(key)
                return text
        return (fallback or (lambda word: f"The {word}"))(self.root())


def _allocate(num_documents: int) -> list[str]:
    """Kinds for each document, by largest remainder so that small corpora still get persons and towns first."""
    exact = [(kind, w * num_documents) for kind, w in KIND_WEIGHTS]
    counts = {kind: int(x) for kind, x in exact}
    left = num_documents - sum(counts.values())
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i][1] - int(exact[i][1])), i))
    for i in order[:left]:
        counts[exact[i][0]] += 1
    return [kind for kind, _ in KIND_WEIGHTS for _ in range(counts[kind])]


def _make_entity(kind: str, index: int, namer: _Namer) -> _Entity:
    rng = namer.rng
    eid = f"{kind}-{index:05d}"
    if kind == "person":
        given = namer.root(GIVEN_ENDINGS, (1, 2))
        surname = namer.root(SURNAME_ENDINGS, (1, 2))
        name = f"{given} {surname}"
        return _Entity(kind, eid, name, name, [name, surname], short=surname)
    if kind == "town":
        name = namer.root(TOWN_ENDINGS, (2, 2, 3))
        return _Entity(kind, eid, name, name, [name])
    if kind == "river":
        root = namer.root(RIVER_ENDINGS, (1, 2))
        return _Entity(kind, eid, f"River {root}", f"the River {root}", [f"River {root}", root])
    if kind == "mountain":
        root = namer.root(("", "", "horn", "fell", "crag"), (2, 2))
        return _Entity(kind, eid, f"Mount {root}", f"Mount {root}", [f"Mount {root}", root])
    adj, noun = (lambda: rng.choice(ADJECTIVES)), (lambda: rng.choice(NOUNS))
    if kind == "company":
        style = rng.randrange(4)
        if style == 0:
            name = f"{namer.root()} & {namer.root(SURNAME_ENDINGS)}"
        elif style == 1:
            name = f"{namer.root(SURNAME_ENDINGS)} Brothers"
        else:
            name = f"{namer.root()} {('Trading Company', 'Company')[style - 2]}"
        mention = f"the {name}" if name.endswith("Company") else name
        return _Entity(kind, eid, name, mention, [name])
    if kind == "guild":
        if rng.random() < 0.5:
            name = namer.phrase((lambda: f"Guild of the {adj()} {noun()}",), lambda word: f"{word} Guild")
        else:
            name = f"{namer.root(TOWN_ENDINGS)} Guild"
        return _Entity(kind, eid, name, f"the {name}", [name])
    if kind == "order":
        if rng.random() < 0.6:
            name = namer.phrase((lambda: f"Order of the {adj()} {noun()}",), lambda word: f"Order of Saint {word}")
        else:
            name = f"Order of Saint {namer.root(GIVEN_ENDINGS)}"
        return _Entity(kind, eid, name, f"the {name}", [name])
    # Works: titles never contain another entity's name, so a title does not give away its facts.
    styles = {
        "book": (lambda: f"The {adj()} {noun()}", lambda: f"{noun()} and {noun()}",
                 lambda: f"The {noun()} of {namer.root()}",
                 lambda: f"{_upper_first(_article(noun()))} for {namer.root(GIVEN_ENDINGS)}"),
        "opera": (lambda: namer.root(GIVEN_ENDINGS), lambda: f"The {noun()} of {namer.root()}",
                  lambda: f"The {adj()} {noun()}"),
        "painting": (lambda: f"{adj()} {noun()}", lambda: f"Study of {_article(adj())} {noun()}",
                     lambda: f"The {noun()} at Evening", lambda: f"The {adj()} {noun()}"),
    }[kind]
    name = namer.phrase(styles)
    return _Entity(kind, eid, name, name, [name])


def _pick(rng: random.Random, pool: list[_Entity]) -> _Entity | None:
    return rng.choice(pool) if pool else None


def _assign_facts(entities: list[_Entity], namer: _Namer) -> None:
    """Draws every entity's facts; relations point at other entities of the corpus and agree in time."""
    rng = namer.rng
    by_kind: dict[str, list[_Entity]] = {kind: [] for kind, _ in KIND_WEIGHTS}
    for e in entities:
        by_kind[e.kind].append(e)
    persons, towns, rivers, mountains = by_kind["person"], by_kind["town"], by_kind["river"], by_kind["mountain"]
    regions = [namer.root(REGION_ENDINGS, (1, 2)) for _ in range(max(3, len(entities) // 60))]
    seas = [f"{namer.root(('',), (2,))} Sea" for _ in range(max(2, len(entities) // 250))]

    for t in towns:
        t.facts.update(town_region=rng.choice(regions), town_founded=rng.randint(700, 1850))
        if rivers:
            t.facts["river"] = rng.choice(rivers)
        # Log-uniform so small villages and large cities both occur; rounded to tens as a census would.
        t.facts["population"] = f"{round(300 * 800 ** rng.random(), -1):,.0f}"
        if mountains and rng.random() < 0.6:
            t.facts["mountain"] = rng.choice(mountains)
    by_founding = sorted(towns, key=lambda t: t.facts["town_founded"])
    foundings = [t.facts["town_founded"] for t in by_founding]

    def town_by(year: int) -> _Entity | None:
        """A town founded by `year` (None if there is none yet): births, organisations and works agree in time."""
        return _pick(rng, by_founding[: bisect.bisect_right(foundings, year)])

    for p in persons:
        birth = rng.randint(1100, 1890)
        p.facts.update(occupation=rng.choice(OCCUPATIONS), birth_year=birth, death_year=birth + rng.randint(30, 95))
        if (town := town_by(birth)) is not None:
            p.facts["birthplace"] = town
    for p in persons:  # teachers are older persons still alive in the pupil's youth, found by a few random tries
        for _ in range(8):
            t = rng.choice(persons)
            gap = p.facts["birth_year"] - t.facts["birth_year"]
            if 15 <= gap <= 70 and t.facts["death_year"] >= p.facts["birth_year"] + 15:
                p.facts["teacher"] = t
                break
    for r in rivers:
        r.facts.update(river_region=rng.choice(regions), length=f"{rng.randint(20, 2400):,} kilometres")
        if mountains:
            r.facts["source"] = rng.choice(mountains)
        r.facts["mouth"] = rng.choice(seas)
    for m in mountains:
        m.facts.update(mountain_region=rng.choice(regions), height=f"{rng.randint(400, 6800):,} metres")
        climber = _pick(rng, persons)
        if climber is not None:
            m.facts["first_climber"] = climber
            m.facts["first_ascent"] = rng.randint(climber.facts["birth_year"] + 18, climber.facts["death_year"])
        else:
            m.facts["first_ascent"] = rng.randint(1600, 1950)
    for kind in ORG_KINDS:
        for o in by_kind[kind]:
            o.facts["field"] = rng.choice(FIELDS)
            founder = _pick(rng, persons)
            if founder is not None:
                o.facts["founder"] = founder
                b, d = founder.facts["birth_year"], founder.facts["death_year"]
                o.facts["org_founded"] = rng.randint(b + 20, d - 1)
                founder.facts.setdefault("founded", o)  # the one the person's article states
                founder.facts.setdefault("all_founded", []).append(o)  # every one is a right answer
            else:
                o.facts["org_founded"] = rng.randint(1100, 1950)
            if (town := town_by(o.facts["org_founded"])) is not None:
                o.facts["headquarters"] = town
    for kind in WORK_KINDS:
        for w in by_kind[kind]:
            w.facts["genre"] = rng.choice(GENRES[kind])
            creator = _pick(rng, persons)
            if creator is not None:
                w.facts["creator"] = creator
                w.facts["work_year"] = rng.randint(creator.facts["birth_year"] + 16, creator.facts["death_year"])
                creator.facts.setdefault("created", w)
                creator.facts.setdefault("all_created", []).append(w)
            else:
                w.facts["work_year"] = rng.randint(1100, 1950)
            if (town := town_by(w.facts["work_year"])) is not None:
                w.facts["depicts" if kind == "painting" else "setting"] = town


def _answer(value) -> tuple[str, str, list[str]]:
    """(answer span, how prose mentions it, all accepted answers) for one fact value."""
    if isinstance(value, _Entity):
        return value.name, value.mention, list(value.aliases)
    text = str(value)
    aliases = [text]
    if text.endswith(" Sea"):
        return text, f"the {text}", aliases
    if "," in text or text.endswith("metres"):
        number = text.split(" ")[0]
        for alt in (number, number.replace(",", ""), text.replace(",", "")):
            if alt not in aliases:
                aliases.append(alt)
        if text.endswith("kilometres"):
            aliases.append(f"{number} km")
    return text, text, aliases


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _upper_first(text: str) -> str:
    return text[0].upper() + text[1:]


def _fill(template: str, slots: dict) -> str:
    return _upper_first(template.format(**slots))


def _write(entity: _Entity, rng: random.Random) -> tuple[Document, list[QAPair]]:
    """Renders one entity as a document plus one QAPair per fact its text states."""
    kind, name = entity.kind, entity.name
    is_person = kind == "person"
    work_slots = {}
    if kind in WORK_KINDS:
        v, vp, vy, role = WORK_VERBS[kind]
        work_slots = dict(v=v, vp=vp, vy=vy, role=role)
    kind_slots = dict(k_a=_article(kind), k=kind)

    # Short / medium / long documents: how many facts are kept and how much filler surrounds them.
    r = rng.random()
    max_extra, n_fill = (3, rng.randint(0, 1)) if r < 0.3 else (
        (9, rng.randint(2, 6)) if r < 0.75 else (9, rng.randint(9, 17)))

    intro = INTRO_FACT[kind]
    keys = [k for k in FACTS if k in entity.facts and k != intro]  # FACTS order keeps this deterministic
    keys = [k for k in keys if rng.random() < 0.9]
    rng.shuffle(keys)
    keys = [intro] + keys[:max_extra]

    def subject(first: bool) -> str:
        if is_person and not first and rng.random() < 0.6:
            return entity.short
        return entity.mention

    fact_sentences, qa = [], []
    for i, key in enumerate(keys):
        value = entity.facts[key]
        a, m, aliases = _answer(value)
        if key in ("founded", "created"):  # any organisation X founded is right; any book of X's for "Which book"
            others = [o for o in entity.facts[f"all_{key}"] if key == "founded" or o.kind == value.kind]
            aliases += [n for o in others for n in o.aliases if n not in aliases]
        slots = dict(S=subject(i == 0), a=a, aa=_article(a), m=m, **kind_slots)
        if key == "created":  # the person's work: verbs come from the work's kind
            v, vp, _, _ = WORK_VERBS[value.kind]
            slots.update(k=value.kind, v=v, vp=vp, vinf={"wrote": "write", "composed": "compose",
                                                         "painted": "paint"}[v])
        else:
            slots.update(work_slots)
        statements, questions = FACTS[key]
        fact_sentences.append(_fill(rng.choice(statements), slots))
        q_slots = dict(slots, n=entity.mention)
        qa.append(QAPair(id=f"{entity.id}-{key}", question=_fill(rng.choice(questions), q_slots),
                         answers=aliases, doc_ids=[entity.id]))

    group = "org" if kind in ORG_KINDS else "work" if kind in WORK_KINDS else kind
    pool = list(FILLERS[group] + FILLERS_COMMON)
    rng.shuffle(pool)
    words = sum(len(s.split()) for s in fact_sentences)
    fillers = []
    for template in pool:
        # Every document gets at least MIN_WORDS words, so none is shorter than about one chunk.
        if len(fillers) >= n_fill and words >= MIN_WORDS:
            break
        slots = {k: rng.choice(v) for k, v in FILL_WORDS.items()}
        slots["a_adj"] = _article(slots["adj"])
        # Filler may say "the town" instead of the name; fact sentences always name the entity.
        who = f"the {kind}" if not is_person and rng.random() < 0.35 else subject(False)
        fillers.append(_fill(template, dict(slots, S=who)))
        words += len(fillers[-1].split())
    body = fact_sentences[1:] + fillers
    rng.shuffle(body)
    text = " ".join([fact_sentences[0]] + body)

    for pair in qa:  # the contract every reader of this corpus relies on
        if pair.answers[0] not in text:
            raise RuntimeError(f"builtin_corpus: answer {pair.answers[0]!r} of {pair.id} not in its document")
    return Document(id=entity.id, title=name, text=text), qa


def generate(num_documents: int = 2000, seed: int = 0) -> tuple[list[Document], list[QAPair]]:
    """Generates `num_documents` fictional encyclopedia articles and their questions, deterministically from `seed`.

    Every QAPair's answers[0] is a verbatim span of the one document in its doc_ids; further answers are aliases
    (a surname, a number without its unit or commas).
    """
    if isinstance(num_documents, bool) or not isinstance(num_documents, int) or num_documents < 0:
        raise ValueError(f"builtin corpus: num_documents must be a non-negative integer, got {num_documents!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"builtin corpus: seed must be an integer, got {seed!r}")
    rng = random.Random(seed)
    namer = _Namer(rng)
    counters: dict[str, int] = {}
    entities = []
    for kind in _allocate(num_documents):
        counters[kind] = counters.get(kind, 0) + 1
        entities.append(_make_entity(kind, counters[kind], namer))
    _assign_facts(entities, namer)
    documents, qa = [], []
    for entity in entities:
        doc, pairs = _write(entity, rng)
        documents.append(doc)
        qa.extend(pairs)
    return documents, qa


def statistics(documents: list[Document], qa: list[QAPair]) -> dict:
    """Counts for the README: documents and questions overall and per kind, document length, answer length."""
    words = [len(d.text.split()) for d in documents]
    per_kind: dict[str, dict[str, int]] = {}
    for d in documents:
        per_kind.setdefault(d.id.rsplit("-", 1)[0], {"documents": 0, "qa_pairs": 0})["documents"] += 1
    for q in qa:
        kind = q.doc_ids[0].rsplit("-", 1)[0] if q.doc_ids else "none"
        per_kind.setdefault(kind, {"documents": 0, "qa_pairs": 0})["qa_pairs"] += 1
    answer_words = [len(q.answers[0].split()) for q in qa]
    return {
        "documents": len(documents),
        "qa_pairs": len(qa),
        "qa_per_document": round(len(qa) / len(documents), 2) if documents else 0.0,
        "per_kind": per_kind,
        "words_per_document": {
            "mean": round(sum(words) / len(words), 1) if words else 0.0,
            "min": min(words, default=0),
            "max": max(words, default=0),
        },
        "mean_answer_words": round(sum(answer_words) / len(answer_words), 2) if answer_words else 0.0,
    }
