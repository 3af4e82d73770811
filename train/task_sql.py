"""Text-to-SQL over small seeded SQLite databases, and its execution checker.

Every sample draws a schema (shop, company, school, library), fills its tables with seeded
rows, picks a question template whose slots are filled from those rows (so answers are rarely
empty), and executes the gold SQL in an in-memory sqlite3 database: a sample whose gold query
fails or returns nothing is never emitted. The user message carries the ``CREATE TABLE`` lines
and the question, because the model cannot guess column names otherwise. The row keeps the
whole setup script, so a test file is self-contained: the checker rebuilds the database from
the row alone.

Checking is execution accuracy (as in Spider): the model's first SQL statement runs against
that row's database, read-only and with a step budget, and its result must equal the gold
result as a multiset of rows, or as a list when the gold query has ``ORDER BY``. Numbers are
compared rounded to 4 decimals, so ``5`` and ``5.0`` agree.

This module knows nothing about models, chat templates or training.
"""

from __future__ import annotations

import datetime
import random
import re
import sqlite3
from dataclasses import dataclass
from typing import Any, Callable

from train.task_common import CITIES, FIRST_NAMES, LAST_NAMES, MONTHS, full_name

NAME = "sql"
# The SQLite VM aborts a query after about this many instructions (the progress handler
# is called every 1000): model SQL can be a runaway cross join or recursive CTE.
_MAX_VM_STEPS = 20_000_000


@dataclass(frozen=True)
class _Template:
    phrasings: tuple[str, ...]
    sql: str
    slots: dict[str, Callable[[random.Random, dict], Any]]


def _pick(key: str) -> Callable[[random.Random, dict], Any]:
    return lambda rng, facts: rng.choice(facts[key])


def _between(key: str) -> Callable[[random.Random, dict], Any]:
    """An integer strictly inside the range of a numeric fact, so comparisons split the rows."""

    def draw(rng: random.Random, facts: dict) -> int:
        values = sorted(facts[key])
        lo, hi = int(values[0]), int(values[-1])
        return rng.randint(lo, hi - 1) if hi > lo else lo

    return draw


def _q(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _insert(table: str, rows: list[tuple]) -> str:
    def lit(v: Any) -> str:
        return _q(v) if isinstance(v, str) else repr(v)

    values = ", ".join("(" + ", ".join(lit(v) for v in r) + ")" for r in rows)
    return f"INSERT INTO {table} VALUES {values};"


def _random_date(rng: random.Random, years: tuple[int, ...]) -> str:
    start = datetime.date(rng.choice(years), 1, 1)
    return (start + datetime.timedelta(days=rng.randrange(365))).isoformat()


# --------------------------------------------------------------------------- schemas

_PRODUCTS = (
    ("kettle", "kitchen"), ("toaster", "kitchen"), ("blender", "kitchen"), ("frying pan", "kitchen"),
    ("desk lamp", "home"), ("pillow", "home"), ("curtain", "home"), ("rug", "home"), ("mirror", "home"),
    ("headphones", "electronics"), ("keyboard", "electronics"), ("monitor", "electronics"),
    ("webcam", "electronics"), ("charger", "electronics"), ("tent", "outdoor"), ("backpack", "outdoor"),
    ("sleeping bag", "outdoor"), ("water bottle", "outdoor"), ("novel", "books"), ("cookbook", "books"),
)
_DEPARTMENTS = ("Sales", "Marketing", "Engineering", "Finance", "Support", "Legal", "Research", "Design")
_COURSES = ("Algebra", "Biology", "Chemistry", "History", "Physics", "Art", "Music", "Geography", "Literature", "Economics")
_BOOK_WORDS = ("River", "Shadow", "Garden", "Winter", "Silver", "Ocean", "Forest", "Mountain", "Glass", "Stone", "Night", "Harbor")
_BOOK_FORMS = ("The {w} Road", "{w} Song", "A {w} Year", "The Last {w}", "{w} and Ash", "Beyond the {w}")
_COUNTRIES = ("Spain", "France", "Japan", "Kenya", "Brazil", "Canada", "India", "Norway", "Italy", "Mexico")


def _shop(rng: random.Random) -> tuple[dict, dict]:
    cities = rng.sample(CITIES, rng.randint(3, 5))
    names = rng.sample([f"{f} {l}" for f in FIRST_NAMES for l in LAST_NAMES], rng.randint(8, 12))
    customers = [(i + 1, n, rng.choice(cities), rng.randint(2018, 2024)) for i, n in enumerate(names)]
    catalog = rng.sample(_PRODUCTS, rng.randint(8, 12))
    prices = rng.sample(range(500, 20000, 25), len(catalog))
    products = [(i + 1, p, c, prices[i] / 100) for i, (p, c) in enumerate(catalog)]
    # Some customers never order, so "never placed an order" has an answer.
    buyers = customers[: max(3, len(customers) - rng.randint(1, 3))]
    orders = [
        (i + 1, rng.choice(buyers)[0], rng.choice(products)[0], rng.randint(1, 5), _random_date(rng, (2023, 2024)))
        for i in range(rng.randint(15, 30))
    ]
    tables = {
        "customers": ("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT, signup_year INTEGER);", customers),
        "products": ("CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, category TEXT, price REAL);", products),
        "orders": ("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, product_id INTEGER, quantity INTEGER, order_date TEXT);", orders),
    }
    ordered_products = sorted({o[2] for o in orders})
    facts = {
        "city": sorted({c[2] for c in customers}), "customer": [c[1] for c in buyers], "year": sorted({c[3] for c in customers}),
        "category": sorted({p[2] for p in products}), "price": [int(p[3]) for p in products],
        "product": [products[i - 1][1] for i in ordered_products], "k": [2, 3, 4, 5],
        "month": sorted({o[4][:7] for o in orders}), "n_city": [1, 2],
    }
    return tables, facts


def _company(rng: random.Random) -> tuple[dict, dict]:
    depts = rng.sample(_DEPARTMENTS, rng.randint(3, 5))
    dept_cities = [rng.choice(CITIES[:8]) for _ in depts]
    departments = [(i + 1, d, dept_cities[i]) for i, d in enumerate(depts)]
    # Distinct department sizes and salaries keep "most" / "highest" questions free of ties.
    sizes = rng.sample(range(1, 6), len(depts))
    names = rng.sample([f"{f} {l}" for f in FIRST_NAMES for l in LAST_NAMES], sum(sizes))
    salaries = rng.sample(range(30000, 150000, 500), len(names))
    employees, k = [], 0
    for d, size in enumerate(sizes):
        for _ in range(size):
            employees.append((k + 1, names[k], d + 1, salaries[k], rng.randint(2010, 2024)))
            k += 1
    tables = {
        "departments": ("CREATE TABLE departments (id INTEGER PRIMARY KEY, name TEXT, city TEXT);", departments),
        "employees": ("CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT, department_id INTEGER, salary INTEGER, hire_year INTEGER);", employees),
    }
    facts = {
        "dept": depts, "dept_city": sorted(set(dept_cities)), "salary": salaries, "year": [e[4] for e in employees],
        "employee": names,
    }
    return tables, facts


def _school(rng: random.Random) -> tuple[dict, dict]:
    names = rng.sample([f"{f} {l}" for f in FIRST_NAMES for l in LAST_NAMES], rng.randint(8, 12))
    cities = rng.sample(CITIES, 3)
    students = [(i + 1, n, rng.randint(9, 12), rng.choice(cities)) for i, n in enumerate(names)]
    titles = rng.sample(_COURSES, rng.randint(4, 6))
    courses = [(i + 1, t, rng.randint(1, 6)) for i, t in enumerate(titles)]
    enrollments = []
    for s in students:
        for c in rng.sample(courses, rng.randint(1, 3)):
            enrollments.append((s[0], c[0], rng.randint(40, 100)))
    tables = {
        "students": ("CREATE TABLE students (id INTEGER PRIMARY KEY, name TEXT, grade INTEGER, city TEXT);", students),
        "courses": ("CREATE TABLE courses (id INTEGER PRIMARY KEY, title TEXT, credits INTEGER);", courses),
        "enrollments": ("CREATE TABLE enrollments (student_id INTEGER, course_id INTEGER, score INTEGER);", enrollments),
    }
    taken = sorted({e[1] for e in enrollments})
    facts = {
        "grade": sorted({s[2] for s in students}), "course": [courses[i - 1][1] for i in taken],
        "credits": [c[2] for c in courses], "student": names, "city": sorted({s[3] for s in students}),
        "score": [e[2] for e in enrollments],
    }
    return tables, facts


def _library(rng: random.Random) -> tuple[dict, dict]:
    author_names = rng.sample([f"{f} {l}" for f in FIRST_NAMES for l in LAST_NAMES], rng.randint(3, 5))
    authors = [(i + 1, n, rng.choice(_COUNTRIES[:5])) for i, n in enumerate(author_names)]
    titles = rng.sample([form.format(w=w) for form in _BOOK_FORMS for w in _BOOK_WORDS], rng.randint(6, 10))
    pages = rng.sample(range(90, 900), len(titles))
    books = [(i + 1, t, rng.choice(authors)[0], rng.randint(1950, 2023), pages[i]) for i, t in enumerate(titles)]
    members = rng.sample(FIRST_NAMES, 5)
    loans = [(i + 1, rng.choice(books)[0], rng.choice(members), _random_date(rng, (2023, 2024))) for i in range(rng.randint(10, 20))]
    tables = {
        "authors": ("CREATE TABLE authors (id INTEGER PRIMARY KEY, name TEXT, country TEXT);", authors),
        "books": ("CREATE TABLE books (id INTEGER PRIMARY KEY, title TEXT, author_id INTEGER, year INTEGER, pages INTEGER);", books),
        "loans": ("CREATE TABLE loans (id INTEGER PRIMARY KEY, book_id INTEGER, member TEXT, loan_date TEXT);", loans),
    }
    writers = sorted({b[2] for b in books})
    facts = {
        "author": [authors[i - 1][1] for i in writers], "year": [b[3] for b in books], "country": sorted({a[2] for a in authors}),
        "title": sorted({books[l[1] - 1][1] for l in loans}), "member": sorted({l[2] for l in loans}),
    }
    return tables, facts


_T = _Template
_SCHEMAS: dict[str, tuple[Callable, tuple[_Template, ...]]] = {
    "shop": (_shop, (
        _T(("How many customers are there?", "Count the customers.", "What is the total number of customers?"),
           "SELECT COUNT(*) FROM customers;", {}),
        _T(("List the names of customers who live in {city}.", "Which customers are from {city}? Give their names.",
            "Show the names of all customers in {city}."),
           "SELECT name FROM customers WHERE city = {city!q};", {"city": _pick("city")}),
        _T(("Which products cost more than {x}?", "List the names of products priced above {x}.",
            "Show every product whose price is over {x}."),
           "SELECT name FROM products WHERE price > {x};", {"x": _between("price")}),
        _T(("What is the average price of products in the {cat} category?", "Give the average price of {cat} products."),
           "SELECT AVG(price) FROM products WHERE category = {cat!q};", {"cat": _pick("category")}),
        _T(("How many customers are there in each city?", "Count the customers per city."),
           "SELECT city, COUNT(*) FROM customers GROUP BY city;", {}),
        _T(("Show the {k} most expensive products.", "List the names of the {k} priciest products, most expensive first."),
           "SELECT name FROM products ORDER BY price DESC LIMIT {k};", {"k": _pick("k")}),
        _T(("Which customers ordered the {product}? Give their names.", "List the customers who bought the {product}."),
           "SELECT DISTINCT c.name FROM customers c JOIN orders o ON o.customer_id = c.id JOIN products p ON p.id = o.product_id WHERE p.name = {product!q};",
           {"product": _pick("product")}),
        _T(("What is the total quantity ordered by {customer}?", "How many items has {customer} ordered in total?"),
           "SELECT SUM(o.quantity) FROM orders o JOIN customers c ON c.id = o.customer_id WHERE c.name = {customer!q};",
           {"customer": _pick("customer")}),
        _T(("Which cities have more than {n} customers?", "List the cities with more than {n} customers."),
           "SELECT city FROM customers GROUP BY city HAVING COUNT(*) > {n};", {"n": _pick("n_city")}),
        _T(("How many orders were placed in {month_name}?", "Count the orders from {month_name}."),
           "SELECT COUNT(*) FROM orders WHERE order_date LIKE {month_like!q};", {"month": _pick("month")}),
        _T(("Which customers have never placed an order?", "List the names of customers with no orders."),
           "SELECT name FROM customers WHERE id NOT IN (SELECT customer_id FROM orders);", {}),
        _T(("How many customers signed up in {year}?", "Count the customers who joined in {year}."),
           "SELECT COUNT(*) FROM customers WHERE signup_year = {year};", {"year": _pick("year")}),
    )),
    "company": (_company, (
        _T(("How many employees work in the {dept} department?", "Count the employees in {dept}."),
           "SELECT COUNT(*) FROM employees e JOIN departments d ON d.id = e.department_id WHERE d.name = {dept!q};",
           {"dept": _pick("dept")}),
        _T(("List the names of employees whose salary is above {x}.", "Which employees earn more than {x}?"),
           "SELECT name FROM employees WHERE salary > {x};", {"x": _between("salary")}),
        _T(("What is the average salary in each department?", "Show the average salary per department."),
           "SELECT d.name, AVG(e.salary) FROM employees e JOIN departments d ON d.id = e.department_id GROUP BY d.name;", {}),
        _T(("Who is the highest paid employee?", "Which employee has the highest salary?"),
           "SELECT name FROM employees ORDER BY salary DESC LIMIT 1;", {}),
        _T(("Which employees were hired after {year}?", "List the employees hired after {year}."),
           "SELECT name FROM employees WHERE hire_year > {year};", {"year": _between("year")}),
        _T(("What is the highest salary in the {dept} department?", "Give the maximum salary in {dept}."),
           "SELECT MAX(e.salary) FROM employees e JOIN departments d ON d.id = e.department_id WHERE d.name = {dept!q};",
           {"dept": _pick("dept")}),
        _T(("Which departments are located in {city}?", "List the departments based in {city}."),
           "SELECT name FROM departments WHERE city = {city!q};", {"city": _pick("dept_city")}),
        _T(("What is the total salary of all employees?", "Sum the salaries of every employee."),
           "SELECT SUM(salary) FROM employees;", {}),
        _T(("Which department has the most employees?", "Name the department with the largest number of employees."),
           "SELECT d.name FROM departments d JOIN employees e ON e.department_id = d.id GROUP BY d.name ORDER BY COUNT(*) DESC LIMIT 1;", {}),
        _T(("Which department does {employee} work in?", "In which department is {employee}?"),
           "SELECT d.name FROM departments d JOIN employees e ON e.department_id = d.id WHERE e.name = {employee!q};",
           {"employee": _pick("employee")}),
    )),
    "school": (_school, (
        _T(("List the names of students in grade {g}.", "Which students are in grade {g}?"),
           "SELECT name FROM students WHERE grade = {g};", {"g": _pick("grade")}),
        _T(("How many students are in each grade?", "Count the students per grade."),
           "SELECT grade, COUNT(*) FROM students GROUP BY grade;", {}),
        _T(("Which students are enrolled in {course}?", "List the names of students taking {course}."),
           "SELECT s.name FROM students s JOIN enrollments e ON e.student_id = s.id JOIN courses c ON c.id = e.course_id WHERE c.title = {course!q};",
           {"course": _pick("course")}),
        _T(("What is the average score in {course}?", "Give the average score of students in {course}."),
           "SELECT AVG(e.score) FROM enrollments e JOIN courses c ON c.id = e.course_id WHERE c.title = {course!q};",
           {"course": _pick("course")}),
        _T(("Which courses are worth more than {n} credits?", "List the courses with more than {n} credits."),
           "SELECT title FROM courses WHERE credits > {n};", {"n": _between("credits")}),
        _T(("How many courses is {student} enrolled in?", "Count the courses that {student} takes."),
           "SELECT COUNT(*) FROM enrollments e JOIN students s ON s.id = e.student_id WHERE s.name = {student!q};",
           {"student": _pick("student")}),
        _T(("Which students scored above {x} in {course}?", "List the students with a score over {x} in {course}."),
           "SELECT s.name FROM students s JOIN enrollments e ON e.student_id = s.id JOIN courses c ON c.id = e.course_id WHERE c.title = {course!q} AND e.score > {x};",
           {"course": _pick("course"), "x": _between("score")}),
        _T(("How many students come from {city}?", "Count the students who live in {city}."),
           "SELECT COUNT(*) FROM students WHERE city = {city!q};", {"city": _pick("city")}),
    )),
    "library": (_library, (
        _T(("List the titles of books written by {author}.", "Which books did {author} write?"),
           "SELECT b.title FROM books b JOIN authors a ON a.id = b.author_id WHERE a.name = {author!q};",
           {"author": _pick("author")}),
        _T(("Which books were published before {year}?", "List the titles of books published before {year}."),
           "SELECT title FROM books WHERE year < {year};", {"year": _between("year")}),
        _T(("How many books has each author written?", "Count the books per author."),
           "SELECT a.name, COUNT(*) FROM authors a JOIN books b ON b.author_id = a.id GROUP BY a.name;", {}),
        _T(("Which book has the most pages?", "What is the title of the longest book?"),
           "SELECT title FROM books ORDER BY pages DESC LIMIT 1;", {}),
        _T(("Which authors are from {country}?", "List the authors from {country}."),
           "SELECT name FROM authors WHERE country = {country!q};", {"country": _pick("country")}),
        _T(("How many times was {title} borrowed?", "Count the loans of {title}."),
           "SELECT COUNT(*) FROM loans l JOIN books b ON b.id = l.book_id WHERE b.title = {title!q};",
           {"title": _pick("title")}),
        _T(("Which books has {member} borrowed?", "List the titles borrowed by {member}."),
           "SELECT DISTINCT b.title FROM books b JOIN loans l ON l.book_id = b.id WHERE l.member = {member!q};",
           {"member": _pick("member")}),
        _T(("What is the average number of pages of books published after {year}?", "Give the average page count of books from after {year}."),
           "SELECT AVG(pages) FROM books WHERE year > {year};", {"year": _between("year")}),
    )),
}
SCHEMAS = tuple(_SCHEMAS)


def _fill(text: str, values: dict[str, Any]) -> str:
    """``str.format`` plus ``{name!q}`` for a quoted SQL string literal."""
    return re.sub(r"\{(\w+)(!q)?\}", lambda m: _q(values[m.group(1)]) if m.group(2) else str(values[m.group(1)]), text)


def _run(setup: str, query: str) -> list[tuple]:
    con = sqlite3.connect(":memory:")
    try:
        con.executescript(setup)
        return con.execute(query).fetchall()
    finally:
        con.close()


def sample(rng: random.Random) -> dict | None:
    """One candidate row (without id/split), or ``None`` when the gold result is empty."""
    schema = rng.choice(SCHEMAS)
    build, templates = _SCHEMAS[schema]
    tables, facts = build(rng)
    template = rng.choice(templates)
    values = {slot: draw(rng, facts) for slot, draw in template.slots.items()}
    if "month" in values:
        year, month = values["month"].split("-")
        values["month_name"] = f"{MONTHS[int(month) - 1]} {year}"
        values["month_like"] = f"{values['month']}%"
    question = _fill(rng.choice(template.phrasings), values)
    gold = _fill(template.sql, values)
    ddl = "\n".join(create for create, _ in tables.values())
    setup = ddl + "\n" + "\n".join(_insert(name, rows) for name, (_, rows) in tables.items() if rows)
    result = _run(setup, gold)
    if not result or all(v in (None, 0) for row in result for v in row):
        return None
    return {
        "messages": [{"role": "user", "content": f"Schema:\n{ddl}\n\nQuestion: {question}"}],
        "reference": gold,
        "expected": {"sql": gold, "setup": setup, "ordered": " ORDER BY " in gold, "schema": schema},
    }


# --------------------------------------------------------------------------- checking

_FENCE_RE = re.compile(r"```(?:[A-Za-z]*)\s*\n?(.*?)(?:```|$)", re.S)
_START_RE = re.compile(r"\b(SELECT|WITH)\b", re.I)


def extract_sql(output: str) -> str:
    """The first SQL statement of a model answer (inside a code fence if there is one)."""
    text = output.strip()
    fence = _FENCE_RE.search(text)
    if fence:
        text = fence.group(1).strip()
    start = _START_RE.search(text)
    if start is None:
        return ""
    text = text[start.start():]
    for i, ch in enumerate(text):
        if ch == ";" and sqlite3.complete_statement(text[: i + 1]):
            return text[: i + 1]
    return text.rstrip() + ";"


def _norm_value(v: Any) -> Any:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)):
        return round(float(v), 4)
    return v


def _norm_rows(rows: list[tuple]) -> list[tuple]:
    return [tuple(_norm_value(v) for v in r) for r in rows]


def execute_readonly(setup: str, query: str, max_rows: int = 10_000) -> list[tuple]:
    """Run ``query`` on a fresh database built by ``setup``, read-only, with a step budget.

    Raises:
        sqlite3.Error: the query is invalid, writes, or runs past the budget.
    """
    con = sqlite3.connect(":memory:")
    try:
        con.executescript(setup)
        con.execute("PRAGMA query_only = ON")
        steps = [0]

        def tick() -> int:
            steps[0] += 1000
            return 1 if steps[0] > _MAX_VM_STEPS else 0

        con.set_progress_handler(tick, 1000)
        return con.execute(query).fetchmany(max_rows)
    finally:
        con.close()


def check(row: dict, output: str) -> bool:
    """Execution accuracy: does the model's SQL return the gold result on the row's database?"""
    expected = row["expected"]
    query = extract_sql(output)
    if not query:
        return False
    gold = _norm_rows(execute_readonly(expected["setup"], expected["sql"]))
    try:
        got = _norm_rows(execute_readonly(expected["setup"], query))
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError):
        return False
    if expected.get("ordered"):
        return got == gold
    return sorted(got, key=repr) == sorted(gold, key=repr)
