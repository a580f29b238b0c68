"""The README's example, type-checked by mypy --strict (see [tool.mypy] files).

Not collected by pytest; mypy proves the documented API has the types it claims.
"""

from __future__ import annotations

from pydantic import BaseModel

import saga


class Order(BaseModel):
    order_id: str
    amount_cents: int


class Receipt(BaseModel):
    charge_id: str


checkout = saga.Saga("checkout", input=Order)


@checkout.step(retry=saga.Retry(max_attempts=5), timeout=10)
async def reserve_stock(ctx: saga.Context[Order]) -> str:
    return f"reservation-{ctx.input.order_id}:{ctx.idempotency_key}"


@reserve_stock.compensate
async def release_stock(ctx: saga.Context[Order], reservation_id: str) -> None:
    print("releasing", reservation_id, ctx.idempotency_key)


@checkout.step()
async def charge_card(ctx: saga.Context[Order]) -> Receipt:
    reservation_id: str = ctx.result(reserve_stock)  # typed result of an earlier step
    return Receipt(charge_id=f"ch-{reservation_id}")


@charge_card.compensate(retry=saga.Retry(max_attempts=20))
async def refund(ctx: saga.Context[Order], receipt: Receipt) -> None:
    print("refunding", receipt.charge_id)


async def main(dsn: str) -> None:
    async with saga.Orchestrator(dsn, sagas=[checkout]) as orch:
        run = await checkout.start(Order(order_id="o-1", amount_cents=500), key="o-1")
        try:
            receipt = await run.result(timeout=30)
            print(receipt)
        except saga.RunCompensatedError as exc:
            print("rolled back:", exc.error)
        for event in await run.history():
            print(event.describe())
        status: saga.RunStatus = await orch.get_run(run.id).status()
        print(status)
