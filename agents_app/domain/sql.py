"""The few statements every message and every run makes, written in SQL instead of through the ORM's compiler.

Why: the ORM compiles a query each time it runs one, and for the statements on the path of every message and
every run that compiling is most of their cost: a claimed run read with its conversation, team and message
(`select_with_related`), and three updates (`update`: a message's seq noted on its conversation, a run
announced, a run's end). Each was measured against the ORM (docs/performance-history.md: rounds 8 and 10, and
"Fast paths behind switches"); statements made less often use the ORM. Inserts are not here: `objects.create`
compiles little.

What is kept from the ORM: each value goes through its field's own conversion to and from the database
(`get_db_prep_save`, the backend's and the field's converters), and instances are made with `Model.from_db`
and their related objects cached as `select_related` caches them, so they behave as if a queryset had loaded
them. Like `QuerySet.update`, `update` sets only the fields it is given: an `auto_now` field changes only when
named.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

from django.db import connection
from django.db.models import Model


def column(model: type[Model], name: str) -> str:
    """A model field's column, quoted for SQL."""
    return connection.ops.quote_name(model._meta.get_field(name).column)


def update(model: type[Model], where: dict, values: dict, raw_sets: dict | None = None) -> int:
    """`UPDATE model SET values WHERE where` (each condition an equality, never with None); `raw_sets` are SET
    clauses with one parameter each. Returns the number of rows changed."""
    meta = model._meta
    sets = [*(raw_sets or {}), *(f"{column(model, name)} = %s" for name in values)]
    conditions = [f"{column(model, name)} = %s" for name in where]
    params = [
        *(raw_sets or {}).values(),
        *(meta.get_field(name).get_db_prep_save(value, connection) for name, value in values.items()),
        *(meta.get_field(name).get_db_prep_value(value, connection) for name, value in where.items()),
    ]
    table = connection.ops.quote_name(meta.db_table)
    statement = f"UPDATE {table} SET {', '.join(sets)} WHERE {' AND '.join(conditions)}"  # noqa: S608
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.rowcount


def select_with_related(model: type[Model], ids: Sequence, related: Sequence[str], order_by: str) -> list:
    """`model.objects.select_related(*related).filter(pk__in=ids).order_by(order_by)`: each related name a
    foreign key of `model` itself, loaded with it (LEFT JOIN, so a null key gives None)."""
    if not ids:
        return []
    plan = _select_plan(model, tuple(related), order_by, connection.vendor)
    pk = model._meta.pk
    placeholders = ", ".join(["%s"] * len(ids))
    with connection.cursor() as cursor:
        cursor.execute(plan.sql.format(ids=placeholders), [pk.get_db_prep_value(value, connection) for value in ids])
        rows = cursor.fetchall()
    return [plan.build(row) for row in rows]


class _Part:
    """One model's slice of a joined row: its columns' positions and the converters of each."""

    def __init__(self, model: type[Model], start: int, alias: str):
        self.model = model
        self.fields = model._meta.concrete_fields
        self.names = [field.attname for field in self.fields]
        self.start, self.stop = start, start + len(self.fields)
        # (the column's expression, its converters) per field: converters are called with the expression,
        # as the ORM's compiler calls them (some read its output field).
        self.converters = [_converters(field, alias) for field in self.fields]
        self.pk_index = self.fields.index(model._meta.pk)

    def build(self, row: Sequence):
        values = list(row[self.start : self.stop])
        if values[self.pk_index] is None:  # the LEFT JOIN found nothing
            return None
        for i, (expression, converters) in enumerate(self.converters):
            for convert in converters:
                values[i] = convert(values[i], expression, connection)
        return self.model.from_db(connection.alias, self.names, values)


def _converters(field, alias: str) -> tuple:
    """The field's column expression and what the ORM's compiler applies to its value as read: the backend's
    converters, then the field's own `from_db_value`. (Built once per plan: the backend's converters depend on
    the vendor and the settings, not on the connection they were taken from.)"""
    expression = field.get_col(alias)
    return expression, [*connection.ops.get_db_converters(expression), *expression.get_db_converters(connection)]


class _SelectPlan:
    def __init__(self, model: type[Model], related: tuple[str, ...], order_by: str):
        quote = connection.ops.quote_name
        meta = model._meta
        self.main = _Part(model, 0, "t0")
        columns = [f"t0.{quote(field.column)}" for field in self.main.fields]
        joins = []
        self.related: list[tuple[object, _Part]] = []
        for n, name in enumerate(related, start=1):
            foreign_key = meta.get_field(name)
            target = foreign_key.related_model
            part = _Part(target, len(columns), f"t{n}")
            self.related.append((foreign_key, part))
            columns += [f"t{n}.{quote(field.column)}" for field in part.fields]
            joins.append(
                f"LEFT OUTER JOIN {quote(target._meta.db_table)} t{n} "
                f"ON t{n}.{quote(foreign_key.target_field.column)} = t0.{quote(foreign_key.column)}"
            )
        self.sql = (
            f"SELECT {', '.join(columns)} FROM {quote(meta.db_table)} t0 {' '.join(joins)} "  # noqa: S608
            f"WHERE t0.{quote(meta.pk.column)} IN ({{ids}}) ORDER BY t0.{quote(meta.get_field(order_by).column)}"
        )

    def build(self, row: Sequence):
        instance = self.main.build(row)
        for foreign_key, part in self.related:
            foreign_key.set_cached_value(instance, part.build(row))  # as select_related does
        return instance


@cache
def _select_plan(model: type[Model], related: tuple[str, ...], order_by: str, vendor: str) -> _SelectPlan:
    return _SelectPlan(model, related, order_by)
