"""The one way a generation route answers: a JSON body or an SSE stream, aborting the engine work if the client
leaves, and mapping engine failures to OpenAI errors. Both paths end in `Generation.aclose()`."""

import logging
from collections.abc import AsyncIterator, Callable

from fastapi.responses import JSONResponse, Response

from serving.errors import APIError
from serving.generation import ClientDisconnected, Generation, engine_failure, run_until_disconnected
from serving.streaming import SSEResponse

logger = logging.getLogger("jaxllm.serving")

# nginx's code for "client closed request"; nobody receives it, it only shows in the access log.
_CLIENT_CLOSED = 499


async def _start_and_collect(gen: Generation) -> list:
    await gen.start()
    return await gen.final_outputs()


async def respond(request, gen: Generation, *, stream: bool, request_id: str,
                  to_json: Callable[[list], dict], to_chunks: Callable[[Generation], AsyncIterator[str]]) -> Response:
    headers = {"X-Request-Id": request_id}
    if stream:
        try:
            await run_until_disconnected(request, gen.start())
        except ClientDisconnected:
            await gen.aclose()
            return Response(status_code=_CLIENT_CLOSED)
        except BaseException as exc:
            await gen.aclose()
            if isinstance(exc, Exception):
                raise engine_failure(exc) from None
            raise
        return SSEResponse(to_chunks(gen), gen.aclose, headers=headers)
    try:
        finals = await run_until_disconnected(request, _start_and_collect(gen))
    except ClientDisconnected:
        logger.info("client disconnected; aborted %s", request_id)
        return Response(status_code=_CLIENT_CLOSED)
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001 - every engine failure becomes an OpenAI error
        raise engine_failure(exc) from None
    finally:
        await gen.aclose()
    return JSONResponse(to_json(finals), headers=headers)
