"""Checkers accept right answers in the forms models write them and reject wrong ones (table-driven)."""

from __future__ import annotations

import time

import pytest

from train.tasks import check

SETUP = """CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT, signup_year INTEGER);
INSERT INTO customers VALUES (1, 'Ana Berg', 'Oslo', 2020), (2, 'Tom Ito', 'Rome', 2021), (3, 'Mei Kim', 'Oslo', 2021);
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, total REAL);
INSERT INTO orders VALUES (1, 1, 10.5), (2, 1, 4.5), (3, 2, 7.0);"""


def sql_row(sql: str, ordered: bool = False) -> dict:
    return {"task": "sql", "messages": [{"role": "user", "content": "q"}], "reference": sql,
            "expected": {"sql": sql, "setup": SETUP, "ordered": ordered}}


OSLO = sql_row("SELECT name FROM customers WHERE city = 'Oslo';")
TOP = sql_row("SELECT name FROM customers ORDER BY id DESC LIMIT 2;", ordered=True)
AVG = sql_row("SELECT AVG(total) FROM orders;")
SUM = sql_row("SELECT SUM(total) FROM orders WHERE customer_id = 2;")


@pytest.mark.parametrize("row,output,ok", [
    (OSLO, "SELECT name FROM customers WHERE city = 'Oslo';", True),
    (OSLO, "select name from customers where city='Oslo'", True),                      # no semicolon, lower case
    (OSLO, "```sql\nSELECT c.name FROM customers c WHERE c.city = 'Oslo';\n```", True),  # fenced, aliased
    (OSLO, "Here is the query:\nSELECT name FROM customers WHERE city = 'Oslo'; It lists them.", True),
    (OSLO, "SELECT name FROM customers WHERE city = 'Oslo' ORDER BY name DESC;", True),  # order free when gold unordered
    (OSLO, "SELECT name FROM customers WHERE city = 'Rome';", False),                  # wrong filter
    (OSLO, "SELECT * FROM customers WHERE city = 'Oslo';", False),                     # wrong columns
    (OSLO, "SELECT name FROM customer WHERE city = 'Oslo';", False),                   # no such table
    (OSLO, "SELECT name FROM customers WHERE city = 'Oslo' UNION ALL SELECT 'x';", False),
    (OSLO, "DELETE FROM customers;", False),                                            # not a query
    (OSLO, "I cannot answer that.", False),
    (OSLO, "", False),
    (TOP, "SELECT name FROM customers ORDER BY id DESC LIMIT 2;", True),
    (TOP, "SELECT name FROM customers ORDER BY id ASC LIMIT 2;", False),
    (TOP, "SELECT name FROM customers WHERE id >= 2;", False),                          # same set, order not guaranteed
    (AVG, "SELECT AVG(total) FROM orders;", True),
    (AVG, "SELECT SUM(total) / COUNT(*) FROM orders;", True),                           # same number, other route
    (AVG, "SELECT SUM(total) FROM orders;", False),
    (SUM, "SELECT 7;", True),                                                           # result compare: 7 == 7.0
    (SUM, "SELECT 7.5;", False),
])
def test_sql_checker(row, output, ok):
    assert check("sql", row, output) is ok


def test_sql_checker_stops_runaway_queries():
    runaway = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c;"
    start = time.perf_counter()
    assert check("sql", OSLO, runaway) is False
    assert time.perf_counter() - start < 30


def test_sql_checker_cannot_modify_the_gold_database():
    # A write inside the model's statement is refused (query_only), and the gold still answers.
    assert check("sql", OSLO, "WITH x AS (SELECT 1) UPDATE customers SET city = 'Rome';") is False
    assert check("sql", OSLO, OSLO["reference"]) is True


PERSON = {"task": "json", "expected": {"fields": {"name": "Maria Lopez", "age": 34, "city": "Madrid"}}}
PRICE = {"task": "json", "expected": {"fields": {"product": "Acme kettle", "price": 39.99, "currency": "EUR"}}}


@pytest.mark.parametrize("row,output,ok", [
    (PERSON, '{"name": "Maria Lopez", "age": 34, "city": "Madrid"}', True),
    (PERSON, '{"city": "Madrid", "age": 34, "name": "Maria Lopez"}', True),             # key order free
    (PERSON, 'Sure! ```json\n{"name": "maria  lopez", "age": "34", "city": "Madrid"}\n```', True),  # case/space/number string
    (PERSON, 'Result: {"name": "Maria Lopez", "age": 34.0, "city": "Madrid"} done {"x": 1}', True),  # first object wins
    (PERSON, '{"name": "Maria Lopez", "age": 35, "city": "Madrid"}', False),            # wrong value
    (PERSON, '{"name": "Maria Lopez", "age": 34}', False),                               # missing key
    (PERSON, '{"name": "Maria Lopez", "age": 34, "city": "Madrid", "country": "Spain"}', False),  # extra key
    (PERSON, '{"name": "Maria Lopez", "age": 34, "city": "Madrid"', False),              # unterminated
    (PERSON, '[{"name": "Maria Lopez", "age": 34, "city": "Madrid"}]', True),           # the object inside is found
    (PERSON, "name: Maria Lopez, age: 34, city: Madrid", False),                         # not JSON
    (PERSON, "", False),
    (PRICE, '{"product": "Acme kettle", "price": 39.99, "currency": "EUR"}', True),
    (PRICE, '{"product": "Acme kettle", "price": 39.9, "currency": "EUR"}', False),
    (PRICE, '{"product": "Acme kettle", "price": 39.99, "currency": "euros"}', False),
])
def test_json_checker(row, output, ok):
    assert check("json", row, output) is ok


ROW_460 = {"task": "math", "expected": {"answer": 460}}
ROW_1234 = {"task": "math", "expected": {"answer": 1234}}


@pytest.mark.parametrize("row,output,ok", [
    (ROW_460, "23 * 20 = 460\nAnswer: 460", True),
    (ROW_460, "Answer: 460.0", True),
    (ROW_460, "answer: **460**", True),
    (ROW_460, "The area is 23 * 20 = 460 square meters.\nAnswer: 460 square meters", True),
    (ROW_460, "Answer: 450\nWait, recheck.\nAnswer: 460", True),                      # the last Answer counts
    (ROW_460, "Answer: 460\nAnswer: 450", False),
    (ROW_460, "23 * 20 = 460", False),                                                  # no Answer line
    (ROW_460, "Answer: 46", False),
    (ROW_460, "", False),
    (ROW_1234, "Answer: $1,234", True),
    (ROW_1234, "Answer: -1234", False),
])
def test_math_checker(row, output, ok):
    assert check("math", row, output) is ok
