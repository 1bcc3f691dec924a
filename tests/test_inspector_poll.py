"""What the inspector's page polls: ``/api/requests`` lists summaries only (no heads; an audit
measured 18 MB and 95 ms of the client's event loop per poll with hostile heads, when every row
carried both heads), a request's heads come from ``/api/requests/ID`` (404 once it left the ring),
and the list has an ``ETag`` that changes with every change to the log, so a poll naming it in
``If-None-Match`` gets ``304`` with nothing serialised."""

from __future__ import annotations

import asyncio
import json

from ferrotunnel.client.inspect import Inspector
from ferrotunnel.client.inspect_store import RequestLog

from test_inspector import api, get, inspected, response, rows

MARKER = "X-Marker: only-in-the-heads"


def test_the_list_carries_no_heads_and_the_rows_own_endpoint_has_them(run):
    async def body():
        async with inspected(max_requests=2) as (ing, app, insp):
            r, w = await asyncio.open_connection(*ing.address)
            w.write(get("/first", MARKER + "\r\n"))
            await response(r)
            (row,) = await rows(insp, 1)
            status, fields, listing = await api(insp, "GET", "/api/requests")
            assert status == 200 and b"only-in-the-heads" not in listing and b"HTTP/1.1" not in listing
            assert not {"request_head", "response_head", "request_body", "response_body"} & set(row)
            assert {"id", "time", "tunnel", "visitor", "method", "path", "status", "duration_ms", "request_size",
                    "response_size", "state", "replay_of", "replayable"} <= set(row)
            status, fields, out = await api(insp, "GET", f"/api/requests/{row['id']}")
            assert status == 200 and fields["content-type"] == "application/json"
            detail = json.loads(out)
            assert detail["request_head"].startswith("GET /first HTTP/1.1\r\n") and MARKER in detail["request_head"]
            assert detail["response_head"].startswith("HTTP/1.1 200 OK\r\n")
            assert detail["response_body"] == "app GET /first " and detail["path"] == "/first"
            # unknown, and evicted from the ring (max_requests=2): a clear 404 in JSON
            status, fields, out = await api(insp, "GET", "/api/requests/999")
            assert status == 404 and fields["content-type"] == "application/json"
            assert "no request 999" in json.loads(out)["error"]
            for path in ("/second", "/third"):
                w.write(get(path))
                await response(r)
            await rows(insp, 2)
            w.close()
            assert [x["path"] for x in (await rows(insp, 2))] == ["/third", "/second"]
            status, _, out = await api(insp, "GET", f"/api/requests/{row['id']}")
            assert status == 404 and json.loads(out)["error"] == f"no request {row['id']} (it may have left the last 2)"
    run(body)


def test_a_matching_if_none_match_gets_304_with_nothing_serialised(run, monkeypatch):
    async def body():
        async with inspected() as (ing, app, insp):
            r, w = await asyncio.open_connection(*ing.address)
            w.write(get("/one"))
            await response(r)
            await rows(insp, 1)
            status, fields, out = await api(insp, "GET", "/api/requests")
            etag = fields["etag"]
            assert status == 200 and etag.startswith('"') and etag.endswith('"')
            assert (await api(insp, "GET", "/api/requests"))[1]["etag"] == etag  # nothing changed
            serialised = []
            monkeypatch.setattr(insp, "requests", lambda: serialised.append(1) or [])
            for tag in (etag, f"W/{etag}", f'"other", {etag}', "*"):
                for method in ("GET", "HEAD"):
                    status, fields, out = await api(insp, method, "/api/requests", {"If-None-Match": tag})
                    assert (status, out) == (304, b""), (tag, method)
                    assert fields["etag"] == etag and "content-length" not in fields
                    assert fields["cache-control"] == "no-store" and fields["x-frame-options"] == "DENY"
            assert serialised == []  # a 304 did no serialisation work
            monkeypatch.undo()
            assert (await api(insp, "GET", "/api/requests", {"If-None-Match": '"other"'}))[0] == 200
            # the same checks as ever come first: a foreign Host or Origin gets 403, not 304
            port = insp.address[1]
            assert (await api(insp, "GET", "/api/requests", {"If-None-Match": etag},
                              host=f"rebound.example:{port}"))[0] == 403
            assert (await api(insp, "GET", "/api/requests", {"If-None-Match": etag,
                                                              "Origin": "http://evil.example"}))[0] == 403
            # a new request changes the tag: the old one gets the whole list again
            w.write(get("/two"))
            await response(r)
            got = await rows(insp, 2)
            w.close()
            status, fields, out = await api(insp, "GET", "/api/requests", {"If-None-Match": etag})
            assert status == 200 and fields["etag"] != etag and len(json.loads(out)["requests"]) == 2
            assert [x["path"] for x in got] == ["/two", "/one"]
            async with Inspector(("127.0.0.1", 0)) as other:  # another process's tags never match
                assert other.log.generation == 0 and other.etag != Inspector(("127.0.0.1", 0)).etag
    run(body)


def test_every_change_to_the_log_changes_the_generation():
    log = RequestLog(max_requests=2, body_limit=4)
    seen = [log.generation]

    def changed() -> None:
        assert log.generation != seen[-1]
        seen.append(log.generation)

    ex = log.new("t", None, ("127.0.0.1", 1), None, "POST", "/", b"POST / HTTP/1.1\r\n\r\n", False)
    changed()
    ex.request_body_data(memoryview(b"abcdef"))  # past the body limit still counts (request_size)
    changed()
    ex.request_end()
    changed()
    ex.response_started(200, b"HTTP/1.1 200 OK\r\n\r\n")
    changed()
    ex.response_body_data(memoryview(b"xy"))
    changed()
    ex.finish("done")
    changed()
    ex.finish("incomplete")  # no change: already finished
    assert log.generation == seen[-1]
    log.new("t", None, ("127.0.0.1", 1), None, "GET", "/b", b"GET /b HTTP/1.1\r\n\r\n", False)
    changed()
    log.new("t", None, ("127.0.0.1", 1), None, "GET", "/c", b"GET /c HTTP/1.1\r\n\r\n", False)  # evicts
    changed()
    assert log.get(ex.id) is None
    log.clear()
    changed()


def test_a_long_path_is_cut_in_the_list_and_whole_in_its_row(run):
    """The request target is part of the head: a visitor's 10 KB path is cut in the list too."""
    from ferrotunnel.client.inspect_store import LIST_PATH_LIMIT

    async def body():
        async with inspected() as (ing, app, insp):
            r, w = await asyncio.open_connection(*ing.address)
            long_path = "/" + "p" * 10000
            w.write(get(long_path))
            await response(r)
            (row,) = await rows(insp, 1)
            w.close()
            assert row["path"] == long_path[:LIST_PATH_LIMIT] and row["path_truncated"]
            detail = json.loads((await api(insp, "GET", f"/api/requests/{row['id']}"))[2])
            assert detail["path"] == long_path and not detail["path_truncated"]
            assert len((await api(insp, "GET", "/api/requests"))[2]) < 2 * LIST_PATH_LIMIT
    run(body)
