"""Chat-style training prompts: the requests people type into a chat box (writing, rewriting,
extraction, role-play, explanations, word problems, logic, advice, everyday tech questions).

The first pool (prompts.py) is mostly about code, so a drafter trained on it is right twice as
often on code as on chat (teacher-forced slot-1 0.47 on HumanEval responses, 0.28 on chat-suite
responses). Everything here is built from small hand-written vocabularies crossed with templates
and random numbers; nothing is taken from the benchmark suites (tests check it, word n-grams too).
"""

from __future__ import annotations

import random

PEOPLE = ("a neighbour", "a colleague", "my landlord", "my child's teacher", "my grandmother", "a customer",
          "a new team member", "an old friend", "my manager", "a client", "the school principal", "my doctor",
          "a volunteer group", "my sister", "a hotel manager", "a job recruiter", "my roommate", "a professor",
          "a bakery owner", "the city council")
FAVOURS = ("fed my cat for a week", "helped me move house", "lent me their car", "covered my shift",
           "recommended me for a job", "fixed my bicycle", "brought soup when I was ill", "proofread my thesis",
           "looked after my kids on short notice", "gave me a ride to the airport")
REQUESTS = ("for a deadline extension", "to reschedule our meeting", "for a reference letter", "for a refund",
            "for feedback on my draft", "to borrow a projector", "for a quiet hour during exams",
            "for permission to paint the kitchen", "to split the cost of a new sofa", "for a day off next Friday")
MISHAPS = ("missing their birthday party", "being late to dinner", "forgetting to call back",
           "breaking their favourite mug", "double-booking our lunch", "sending the wrong file",
           "parking in their spot", "losing the book they lent me")
PRODUCTS = ("a folding electric bicycle", "noise-cancelling headphones", "a cast-iron frying pan", "a smart doorbell",
            "a bamboo toothbrush", "a solar-powered phone charger", "a wool winter coat", "a standing desk",
            "a board game for families", "a hand-made ceramic teapot", "a budgeting app", "a robot vacuum cleaner",
            "hiking boots", "a children's picture book about the sea", "an espresso machine", "a mechanical keyboard",
            "a yoga mat", "a language-learning course", "a mini greenhouse", "a pair of running shoes")
EVENTS = ("my best friend's wedding", "a retirement party for a teacher", "the opening of a community garden",
          "a company's tenth anniversary", "a school graduation", "a charity fun run", "a farewell for a colleague",
          "a family reunion", "a science fair", "the launch of a small bookshop")
JOBS = ("junior web developer", "nurse", "warehouse supervisor", "primary school teacher", "graphic designer",
        "bank teller", "lab technician", "barista", "marketing assistant", "electrician's apprentice",
        "museum guide", "software tester", "librarian", "sales representative", "chef")
HOBBIES = ("rock climbing", "baking sourdough", "birdwatching", "chess", "photography", "gardening", "sailing",
           "playing the cello", "trail running", "woodworking")
GENRES = ("science-fiction", "fantasy", "detective", "ghost", "adventure", "romance", "comedy", "fairy-tale")
PLACES = ("an abandoned train station", "a floating city", "a small fishing village", "a desert observatory",
          "a library that never closes", "a space station orbiting Mars", "a mountain monastery",
          "a busy night market", "an island with one tree", "a school for dragons", "a submarine",
          "a snowed-in mountain hut")
SCENES = ("autumn leaves", "a quiet morning in the city", "the ocean at night", "an old oak tree", "a thunderstorm",
          "the first day of spring", "a cup of tea", "a train leaving the station", "a cat asleep in the sun",
          "the stars over a campsite", "a busy kitchen", "a garden after rain")
ANIMALS = ("a penguin", "a lazy dog", "a curious octopus", "a clumsy giraffe", "a wise owl", "a hungry bear",
           "a very small elephant", "a singing frog")
WRITING = (
    "Write a short thank-you note to {person} who {favour}.",
    "Write a polite email to {person} asking {request}.",
    "Write a text message to {person} apologising for {mishap}.",
    "Write a short speech for {event}.",
    "Write a product description for {product}.",
    "Write a customer review of {product}, {mood}.",
    "Write a catchy advertisement for {product} in under 80 words.",
    "Write a social media post announcing {event}.",
    "Write a cover letter for a position as a {job}.",
    "Write a short professional bio for a {job} who enjoys {hobby}.",
    "Write a complaint letter about {product} that stopped working after a week.",
    "Write the first paragraph of a {genre} story set in {place}.",
    "Write a short poem about {scene}.",
    "Write a limerick about {animal}.",
    "Write a dialogue between {animal} and {animal2} who meet in {place}.",
    "Write an encouraging message to {person} before {event}.",
    "Write a toast for {event}.",
    "Write a short story for children about {animal} who learns about {hobby}.",
    "Write a job advertisement for a {job}.",
    "Write a to-do list for preparing {event}.",
    "Describe {place} in five vivid sentences.",
    "Write a haiku about {scene}.",
    "Write a short fable about {animal} with a moral at the end.",
    "Write a diary entry from the point of view of {animal} living in {place}.",
)
MOODS = ("who loves it", "who is disappointed", "who has mixed feelings", "who is surprised by how good it is")

SUBJECTS = ("we", "the team", "my brother", "our landlord", "the kids", "the new guy", "they", "the client")
INFORMAL = (
    "{s} gonna be late cause the bus broke down again",
    "{s} can't make it to the thing tomorrow, sorry",
    "{s} kinda messed up the report so it needs fixing asap",
    "{s} wanna know if the price is still the same or not",
    "{s} totally forgot to send the invoice, my bad",
    "{s} think the new app is way too confusing for normal people",
    "{s} need the keys back by friday or there's gonna be trouble",
    "{s} said the meeting's off cause nobody read the notes",
    "{s} got no idea why the printer keeps doing that",
    "{s} are super happy with how the party turned out",
)
REWRITE = (
    "Rewrite this sentence in formal English: '{text}'.",
    "Make this message sound friendlier: '{text}'.",
    "Correct the grammar and spelling of: '{text}'.",
    "Rewrite this for a business email: '{text}'.",
    "Turn this sentence into a polite request or apology: '{text}'.",
    "Translate this casual sentence into clear, neutral English: '{text}'.",
)
FIRST_NAMES = ("Liam", "Olivia", "Noah", "Emma", "Ava", "Lucas", "Mia", "Ethan", "Sofia", "Mateo", "Chloe",
               "Arjun", "Priya", "Wei", "Yuki", "Fatima", "Omar", "Ingrid", "Pedro", "Zara", "Kofi", "Elena",
               "Hugo", "Nadia", "Tariq", "Grace", "Jonas", "Leila", "Ivan", "Rosa")
CITIES = ("Lyon", "Osaka", "Toronto", "Nairobi", "Porto", "Krakow", "Austin", "Melbourne", "Seoul", "Cairo",
          "Valencia", "Oslo", "Lima", "Dublin", "Hanoi")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
ITEMS = ("AA batteries", "notebooks", "HDMI cables", "coffee mugs", "desk lamps", "printer paper", "water bottles",
         "phone cases", "sticky notes", "headsets")
REVIEWS_POS = ("Works exactly as described.", "Fast delivery and great quality.", "My kids love it.",
               "Best purchase this year.", "Comfortable and well made.")
REVIEWS_NEG = ("Broke after two days.", "The colour is nothing like the photo.", "Customer service never replied.",
               "Too loud to use at night.", "Arrived with a missing part.")


def _extraction(rng: random.Random) -> str:
    names = rng.sample(FIRST_NAMES, 3)
    ages = [rng.randint(6, 88) for _ in names]
    city = rng.choice(CITIES)
    kind = rng.randrange(7)
    if kind == 0:
        text = f"{names[0]} ({ages[0]}) lives in {city} with {names[1]}, aged {ages[1]}, and {names[2]}, who is {ages[2]}."
        return f"Extract every person's name and age from this text as a JSON list: '{text}'"
    if kind == 1:
        d = [f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1990, 2030)}" for _ in range(3)]
        text = f"The lease starts on {d[0]}, the first payment is due {d[1]} and the deposit is returned by {d[2]}."
        return f"List the dates in this text and say what happens on each: '{text}'"
    if kind == 2:
        n, item, price = rng.randint(2, 60), rng.choice(ITEMS), rng.randint(100, 9999) / 100
        cur = rng.choice(("USD", "EUR", "GBP"))
        return (f"Parse this invoice line into product, quantity, unit price and total: "
                f"'{n} x {item} @ {price:.2f} {cur}'")
    if kind == 3:
        a, b = (f"{x.lower()}.{rng.choice(('info', 'team', 'desk'))}@example.{rng.choice(('com', 'org', 'net'))}"
                for x in names[:2])
        return (f"Find the email addresses in this message and say who each belongs to: 'Write to {names[0]} at {a}; "
                f"{names[1]} handles billing ({b}).'")
    if kind == 4:
        picks = rng.sample(REVIEWS_POS, 2) + rng.sample(REVIEWS_NEG, 2)
        rng.shuffle(picks)
        return "Label each review as positive or negative: " + " | ".join(f"'{r}'" for r in picks)
    if kind == 5:
        things = rng.sample(("eggs", "rice", "tomatoes", "olive oil", "bread", "cheese", "bananas", "tea", "soap",
                             "onions", "pasta", "yoghurt"), 4)
        return f"Turn this into a tidy checklist: 'don't forget {things[0]}, some {things[1]}, {things[2]} and maybe {things[3]}'"
    rows = ", ".join(f"{n} scored {rng.randint(40, 100)}" for n in names)
    return f"Make a markdown table from this and add the average: '{rows}.'"


ROLES = ("a tour guide in Rome", "a librarian", "a pirate captain", "a personal trainer", "a kindergarten teacher",
         "a detective in 1920s London", "a friendly robot", "a medieval blacksmith", "a park ranger",
         "a hotel receptionist", "a wizard's apprentice", "an astronaut on the Moon", "a sushi chef",
         "a football coach at half-time", "a bookshop owner", "a lighthouse keeper", "a zookeeper",
         "a bank's help-desk assistant", "a driving instructor", "a career counsellor")
ROLE_TASKS = ("greet a visitor who has just arrived", "explain your typical day to a curious child",
              "give advice to someone who is nervous", "answer a customer who is unhappy with the service",
              "describe the most interesting thing that happened to you this week",
              "give three tips to a beginner", "introduce yourself to a new colleague",
              "persuade a sceptical person to try something new", "calm down a group that is running late")
ROLEPLAY = ("You are {role}. {Task}.", "Act as {role} and {task}.", "Pretend to be {role}: {task}.",
            "Play the role of {role}. In a few sentences, {task}.")

PHENOMENA = ("rainbows form", "bread rises", "leaves change colour in autumn", "we have seasons", "boats float",
             "the Moon has phases", "thunder follows lightning", "salt melts ice on roads", "bicycles stay upright",
             "metal feels colder than wood", "onions make you cry", "soap removes grease", "planes stay in the air",
             "microwaves heat food", "the ocean is salty", "we get hiccups", "cats purr", "popcorn pops",
             "magnets attract iron", "a compass points north", "rubber bands stretch", "the tides rise and fall",
             "stars twinkle", "hot air balloons rise", "batteries run out", "plants grow towards light",
             "we dream", "our ears pop on a plane", "fireworks have different colours", "glass is transparent",
             "sound travels faster in water", "a kettle whistles", "yeast makes beer fizzy", "bones heal",
             "the heart beats faster when we run", "volcanoes erupt", "spiders don't stick to their webs",
             "dogs pant", "the desert gets cold at night", "snowflakes have six sides")
EXPLAIN = ("Why do {p}?", "Explain simply why {p}.", "How is it that {p}? Keep the answer short.",
           "A child asks me why {p}. How should I explain it?", "What is the science behind how {p}?")
PAIRS = (("weather", "climate"), ("a comet", "an asteroid"), ("mass", "weight"), ("an alligator", "a crocodile"),
         ("a solid", "a liquid"), ("RAM", "storage"), ("a republic", "a democracy"), ("a lake", "a pond"),
         ("an atom", "a molecule"), ("a meteor", "a meteorite"), ("baking soda", "baking powder"),
         ("a rabbit", "a hare"), ("an accent", "a dialect"), ("a simile", "a metaphor"), ("HTTP", "HTTPS"),
         ("a loan", "a grant"), ("a fruit", "a vegetable"), ("an ocean", "a sea"), ("a psychologist", "a psychiatrist"),
         ("a hurricane", "a tornado"), ("a compiler", "an interpreter"), ("a list", "a tuple in Python"),
         ("TCP", "UDP"), ("a stock", "a bond"), ("affect", "effect"), ("latitude", "longitude"),
         ("a computer virus", "a computer worm"), ("a symphony", "a concerto"), ("nuclear fission", "nuclear fusion"),
         ("an LED", "an incandescent bulb"))
COMPARE = ("What is the difference between {a} and {b}?", "Compare {a} and {b} in a short table.",
           "People often confuse {a} and {b}. How can I tell them apart?")


def _word_problem(rng: random.Random) -> str:
    r = rng.randint
    name = rng.choice(FIRST_NAMES)
    forms = (
        lambda: f"{name} buys {r(2, 9)} sandwiches at ${r(3, 9)}.{r(10, 95)} each and pays with a ${rng.choice((20, 50, 100))} note. How much change is there?",
        lambda: f"A jacket costs ${r(40, 300)} and is on sale for {rng.choice((10, 15, 20, 25, 30, 40))}% off. What is the sale price? Show the steps.",
        lambda: f"A recipe for {r(2, 6)} people uses {r(150, 600)} g of flour. How much flour is needed for {r(7, 20)} people?",
        lambda: f"A bus leaves at {r(6, 11)}:{rng.choice(('05', '15', '20', '35', '50'))} and the trip takes {r(1, 4)} hours {r(5, 55)} minutes. When does it arrive?",
        lambda: f"Solve for x: {r(2, 12)}x {rng.choice(('+', '-'))} {r(1, 30)} = {r(31, 120)}. Explain each step.",
        lambda: f"A cyclist rides {r(12, 90)} km in {r(2, 5)} hours. What is the average speed, and how long would {r(100, 200)} km take at that speed?",
        lambda: f"One painter needs {r(3, 10)} hours to paint a room and another needs {r(4, 12)} hours. How long if they work together?",
        lambda: f"A garden is {r(4, 30)} m long and {r(3, 20)} m wide. How much fencing goes around it, and what is its area?",
        lambda: f"{name} saves ${r(5, 60)} a week. How many weeks until {name} can buy a bike that costs ${r(150, 900)}?",
        lambda: f"What is the average of {', '.join(str(r(1, 100)) for _ in range(r(4, 7)))}? Explain how you got it.",
        lambda: f"A phone loses {rng.choice((10, 12, 20, 25))}% of its value every year. It cost ${r(300, 1200)}. What is it worth after {r(2, 4)} years?",
        lambda: f"{name} is {r(3, 12)} years older than their cousin, and together they are {r(30, 90)} years old. How old is each?",
        lambda: f"At {r(1, 11)}:{rng.choice(('00', '20', '30', '45'))}, what angle do the hands of a clock make?",
        lambda: f"How many minutes are there in {r(2, 9)} days? And how many seconds?",
        lambda: f"A class has {r(12, 20)} girls and {r(10, 20)} boys. What fraction of the class are girls, in lowest terms?",
        lambda: f"A pizza has {rng.choice((8, 10, 12, 16))} slices. {name} eats {rng.choice(('a quarter', 'half', 'an eighth'))} of it and a friend eats 3 slices. How many slices are left?",
        lambda: f"Convert {r(2, 40)} miles to kilometres and {r(50, 100)} degrees Fahrenheit to Celsius.",
        lambda: f"What is {r(11, 99)} squared, and what is the square root of {rng.choice((144, 196, 225, 289, 324, 361, 400, 625))}?",
        lambda: f"If {r(3, 9)} workers build a wall in {r(4, 12)} days, how long would {r(10, 18)} workers take at the same rate?",
        lambda: f"What is the sum of the even numbers from 2 to {2 * r(10, 60)}? Show a quick way to compute it.",
    )
    return rng.choice(forms)()


NONSENSE = ("glorps", "fendles", "mips", "tazzles", "wobbins", "snerks", "plivs", "drumbles", "quints", "yaffles",
            "borbs", "klents")


def _logic(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        a, b, c = rng.sample(NONSENSE, 3)
        q = rng.choice((f"are all {a} {c}?", f"can some {c} be {a}?", f"must every {c} be a {a[:-1]}?"))
        return f"All {a} are {b}, and all {b} are {c}. Based only on this, {q} Explain your reasoning."
    if kind == 1:
        ppl = rng.sample(FIRST_NAMES, 3)
        adj = rng.choice((("taller", "tallest"), ("older", "oldest"), ("faster", "fastest")))
        return (f"{ppl[0]} is {adj[0]} than {ppl[1]}, and {ppl[2]} is {adj[0]} than {ppl[0]}. "
                f"Who is the {adj[1]}? Explain.")
    if kind == 2:
        start, step = rng.randint(1, 9), rng.randint(2, 5)
        seq = [start * step ** i for i in range(5)] if rng.random() < 0.5 else [start + step * i * i for i in range(5)]
        return f"What number comes next in the sequence {', '.join(map(str, seq))}? Explain the pattern."
    if kind == 3:
        return rng.choice((
            "A bat and a ball cost $1.10 together, and the bat costs $1.00 more than the ball. How much is the ball?",
            "If you overtake the person in second place in a race, what place are you in? Explain.",
            "A man has two coins that add up to 30 cents, and one of them is not a nickel. What are the coins?",
            "How many times can you subtract 5 from 25? Think carefully.",
            "I have keys but no locks, space but no room. What am I? Explain the riddle.",
            "Two fathers and two sons go fishing and catch three fish, one each. How is that possible?",
            "If it takes 5 machines 5 minutes to make 5 widgets, how long do 100 machines take for 100 widgets?",
            "Is a pound of gold heavier than a pound of cotton? Explain.",
        ))
    ppl = rng.sample(FIRST_NAMES, 2)
    return (f"{ppl[0]} says: '{ppl[1]} always lies.' {ppl[1]} says: '{ppl[0]} and I both tell the truth.' "
            f"If each person either always lies or always tells the truth, who is telling the truth?")


HOWTO = ("unclog a kitchen sink", "start running as a complete beginner", "make a monthly budget",
         "prepare for a job interview", "keep houseplants alive", "write a good cover letter", "fall asleep faster",
         "learn to touch-type", "plan a week of cheap healthy meals", "negotiate a higher salary",
         "take better photos with a phone", "stop procrastinating", "organise a small wedding",
         "back up the photos on my laptop", "get better at public speaking", "train a puppy to sit",
         "make friends in a new city", "reduce my electricity bill", "study for an exam in one week",
         "choose a second-hand car", "deal with a difficult coworker", "start journaling", "brew good coffee at home",
         "keep a conversation going on a first date", "pack light for a two-week trip", "remove a wine stain",
         "set up a home Wi-Fi network safely", "teach a child to ride a bike", "start a vegetable garden on a balcony",
         "write a polite reminder to someone who owes me money")
ADVICE = ("How do I {h}?", "Give me five practical tips to {h}.", "What's the best way to {h}?",
          "I want to {h}. Where should I start?", "What mistakes do people make when they try to {h}?")
PRACTICES = ("reuse the same password on several websites", "skip breakfast", "buy an extended warranty",
             "learn two languages at once", "rent instead of buying a home", "work from home full time",
             "use a credit card for everyday purchases", "let children have a smartphone at ten",
             "commit directly to the main branch", "store API keys in the source code", "charge a phone overnight",
             "study with music on")
OPINION = ("Is it a good idea to {p}? Give the pros and cons.", "Should I {p}? Explain the risks.",
           "Give three reasons for and three against: should people {p}?")

TECH = ("What does a DNS server do?", "Explain what an API is with a restaurant analogy.",
        "What is a race condition, and how can it be avoided?", "What is the difference between git pull and git fetch?",
        "Explain what a Python decorator is and show a simple one.", "What is recursion? Give an example in Python.",
        "Explain Big-O notation with examples.", "What is a virtual environment in Python and why use one?",
        "What does 'git stash' do?", "What is the difference between == and 'is' in Python?",
        "Explain what a foreign key is in a database.", "What is a hash function used for?",
        "How does HTTPS keep data private?", "What is the difference between a compiled and an interpreted language?",
        "Explain what Docker containers are.", "What does a load balancer do?", "What is an index in SQL and when does it help?",
        "Explain what JSON is and show an example.", "What is the difference between RAM and a hard drive?",
        "What is a Python generator and when would you use one?", "Explain what 'async' and 'await' do in Python.",
        "How do cookies work in a web browser?", "What is a regular expression? Show three useful examples.",
        "What is the difference between a stack and a queue?", "Explain how a binary search works.",
        "What is two-factor authentication?", "What does an operating system kernel do?",
        "Explain the difference between a shallow copy and a deep copy in Python.",
        "What is a memory leak?", "Explain what a unit test is and show one with pytest.")
TABLES = (("employees", "name, department, salary, hired_on"), ("orders", "id, customer_id, total, created_at"),
          ("books", "title, author, year, copies"), ("students", "name, grade, school, score"),
          ("flights", "code, origin, destination, departs_at, seats_left"))
SQL_TASKS = ("the three rows with the largest {num}", "how many rows there are per {group}",
             "the average {num} per {group}, highest first", "every row created in the last 30 days",
             "the {group} values that appear more than five times")
SHELL = ("find the ten largest files in a folder", "rename every .jpeg file to .jpg",
         "show which process is using port 8080", "count how many times 'error' appears in a log file",
         "delete files older than 30 days in /tmp/reports", "print the disk usage of each subfolder",
         "compress a folder into a tar.gz archive", "list the 5 most recently modified files")


def _tech(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return rng.choice(TECH)
    if kind == 1:
        table, cols = rng.choice(TABLES)
        names = [c.strip() for c in cols.split(",")]
        task = rng.choice(SQL_TASKS).format(num=names[-1] if "total" not in cols else "total", group=names[1])
        return f"A table `{table}` has columns ({cols}). Write a SQL query that returns {task}, and explain it."
    return f"Give me a shell command to {rng.choice(SHELL)}, and explain each part."


STORIES = ("a shy dragon who wants to become a baker", "two rival chess players stuck in a lift",
           "a girl who finds a map inside a library book", "a lighthouse keeper who receives a mysterious letter",
           "a time traveller who can only go back ten minutes", "a town where it never stops snowing",
           "an old dog who becomes a hero", "a chef who loses their sense of taste")
SUMMARY = ("Summarize a story about {s} in {n} sentences.", "Give a title and a three-sentence plot for a story about {s}.",
           "Outline a short film about {s}: beginning, middle and end.")
CLAIMS = ("cities should plant more trees", "schools should teach cooking", "people should learn to swim as children",
          "libraries still matter", "public transport should be free", "everyone should learn basic first aid",
          "companies should allow four-day weeks", "kids should learn to code", "museums should be free to enter",
          "people should read the news less often")
REASONS = ("Give {n} reasons why {c}.", "Argue briefly that {c}, then give the strongest counter-argument.")


def chat_pool(seed: int = 0) -> list[str]:
    """Chat-style prompts (~4,600), deterministic for a seed, shuffled."""
    rng = random.Random(seed + 101)
    out: set[str] = set()

    def pick(seq):
        return rng.choice(seq)

    for _ in range(1100):
        a1, a2 = rng.sample(ANIMALS, 2)
        out.add(pick(WRITING).format(person=pick(PEOPLE), favour=pick(FAVOURS), request=pick(REQUESTS),
                                     mishap=pick(MISHAPS), event=pick(EVENTS), product=pick(PRODUCTS), mood=pick(MOODS),
                                     job=pick(JOBS), hobby=pick(HOBBIES), genre=pick(GENRES), place=pick(PLACES),
                                     scene=pick(SCENES), animal=a1, animal2=a2))
    for _ in range(350):
        out.add(pick(REWRITE).format(text=pick(INFORMAL).format(s=pick(SUBJECTS))))
    for _ in range(450):
        out.add(_extraction(rng))
    for _ in range(400):
        t = pick(ROLE_TASKS)
        out.add(pick(ROLEPLAY).format(role=pick(ROLES), task=t, Task=t[0].upper() + t[1:]))
    out.update(t.format(p=p) for t in EXPLAIN for p in PHENOMENA)
    out.update(t.format(a=a, b=b) for t in COMPARE for a, b in PAIRS)
    for _ in range(700):
        out.add(_word_problem(rng))
    for _ in range(300):
        out.add(_logic(rng))
    out.update(t.format(h=h) for t in ADVICE for h in HOWTO)
    out.update(t.format(p=p) for t in OPINION for p in PRACTICES)
    for _ in range(250):
        out.add(_tech(rng))
    for _ in range(120):
        out.add(pick(SUMMARY).format(s=pick(STORIES), n=rng.choice(("three", "four", "five"))))
        out.add(pick(REASONS).format(c=pick(CLAIMS), n=rng.choice(("three", "four", "five"))))
    prompts = sorted(out)
    rng.shuffle(prompts)
    return prompts
