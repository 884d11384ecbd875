"""Sandbox for Aliyun dysmsapi SendSms and SendBatchSms: recomputes the RPC signature from the same
credentials, refuses stale timestamps and reused nonces, answers business errors as HTTP 200 with Aliyun's
codes, and pushes SmsReport arrays to Loopcast's receipt URL with the shared token (Aliyun's push itself is
unsigned)."""

from __future__ import annotations

import hmac
import json
import math
import re
import time
import uuid
from datetime import UTC, datetime
from urllib.parse import quote

from aiohttp import web

from connectors.channels.aliyun_sms import API_VERSION, BATCH_MOST, rpc_signature
from connectors.channels.sandboxes.core import Received, Sandbox, SandboxContext

PHONE = re.compile(r"^(\+|00)?\d{7,15}$")
TEMPLATE = re.compile(r"^SMS_\d+$")
MAX_SKEW_S = 15 * 60


def error(code: str, message: str, status: int = 200) -> web.Response:
    body = {"RequestId": str(uuid.uuid4()).upper(), "Code": code, "Message": message}
    if status != 200:  # gateway errors carry HostId and Recommend; business errors only Code/Message
        body |= {
            "HostId": "dysmsapi.aliyuncs.com",
            "Recommend": f"https://next.api.aliyun.com/troubleshoot?q={code}&product=Dysmsapi",
        }
    return web.json_response(body, status=status)


def answer(fault: str, status: int) -> web.Response:
    if fault == "throttled":  # per-recipient flow control: HTTP 200, a business code
        return error("isv.BUSINESS_LIMIT_CONTROL", "触发分钟级流控Permits:1")
    if fault == "outage":
        return error("ServiceUnavailable", "The request has failed due to a temporary failure of the server.", status)
    return error("InternalError", "The request processing has failed due to some unknown error.", status)


def segments(text: str) -> int:
    return 1 if len(text) <= 70 else math.ceil(len(text) / 67)


def routes(box: Sandbox, ctx: SandboxContext) -> list[web.RouteDef]:
    credentials = ctx.credentials
    secret = credentials.access_key_secret.get_secret_value()
    separator = "&" if "?" in ctx.receipt_url else "?"
    receipt_url = f"{ctx.receipt_url}{separator}token={quote(credentials.receipt_token.get_secret_value(), safe='')}"
    nonces: dict[str, float] = {}

    def report(item: Received, status: str) -> dict:
        ok = status == "delivered"
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        return {
            "phone_number": item.body["PhoneNumbers"],
            "send_time": now,
            "report_time": now,
            "success": ok,
            "err_code": "DELIVERED" if ok else "MK:0001",
            "err_msg": "用户接收成功" if ok else "用户接收失败",
            "sms_size": str(item.body["sms_size"]),
            "biz_id": item.provider_message_id,
            "out_id": item.body.get("message_id") or "",
        }

    async def push(reports: list[dict]) -> None:
        body = json.dumps(reports, ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json"}
        async with box.client().post(receipt_url, data=body, headers=headers) as response:
            if response.status >= 300:
                raise RuntimeError(f"SmsReport push answered {response.status}")

    async def send_receipt(item: Received, status: str) -> None:
        await push([report(item, status)])

    async def send_receipts(fates: list[tuple[Received, str]]) -> None:
        await push([report(item, status) for item, status in fates])

    def authenticate(params: dict[str, str], method: str) -> web.Response | None:
        given = params.pop("Signature", None)
        if not given or params.get("SignatureMethod") != "HMAC-SHA1" or params.get("SignatureVersion") != "1.0":
            return error("IncompleteSignature", "The request signature does not conform to Aliyun standards.", 400)
        if params.get("AccessKeyId") != credentials.access_key_id:
            return error("InvalidAccessKeyId.NotFound", "Specified access key is not found.", 404)
        if not hmac.compare_digest(given, rpc_signature(secret, params, method)):
            return error("SignatureDoesNotMatch", "Specified signature is not matched with our calculation.", 400)
        try:
            stamp = datetime.strptime(params.get("Timestamp", ""), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        except ValueError:
            return error("InvalidTimeStamp.Format", "Specified time stamp or date value is not well formatted.", 400)
        if abs(time.time() - stamp.timestamp()) > MAX_SKEW_S:
            return error("InvalidTimeStamp.Expired", "Specified time stamp or date value is expired.", 400)
        nonce, now = params.get("SignatureNonce", ""), time.time()
        for old in [n for n, at in nonces.items() if now - at > MAX_SKEW_S]:
            del nonces[old]
        if not nonce or nonce in nonces:
            return error("SignatureNonceUsed", "Specified signature nonce was used already.", 400)
        nonces[nonce] = now
        return None

    async def rpc(request: web.Request) -> web.Response:
        form = await request.post()
        params = {**request.query, **{k: v for k, v in form.items() if isinstance(v, str)}}
        refused = authenticate(params, request.method)
        if refused is not None:
            box.rejected += 1
            return refused
        injected = await box.inject(answer)
        if injected is not None:
            return injected
        action = params.get("Action")
        if action not in ("SendSms", "SendBatchSms") or params.get("Version") != API_VERSION:
            return error("InvalidAction.NotFound", "Specified api is not found, please check your url and method.", 404)
        if action == "SendBatchSms":
            return send_batch(params)
        for name in ("PhoneNumbers", "SignName", "TemplateCode"):
            if not params.get(name):
                return error(f"Missing{name}", f"{name} is mandatory for this action.", 400)
        if not all(PHONE.match(number) for number in params["PhoneNumbers"].split(",")):
            return error("isv.MOBILE_NUMBER_ILLEGAL", "非法手机号")
        if not TEMPLATE.match(params["TemplateCode"]):
            return error("isv.SMS_TEMPLATE_ILLEGAL", "该账号下找不到对应模板")
        try:
            variables = json.loads(params.get("TemplateParam") or "{}")
            if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
                raise ValueError
        except ValueError:
            return error("isv.INVALID_JSON_PARAM", "JSON参数不合法，只接受字符串值")
        content = f"【{params['SignName']}】" + "".join(variables.values())
        body = {
            "message_id": params.get("OutId"),
            "PhoneNumbers": params["PhoneNumbers"],
            "SignName": params["SignName"],
            "TemplateCode": params["TemplateCode"],
            "TemplateParam": variables,
            "sms_size": segments(content),
        }
        item = box.record(body, None)
        item.provider_message_id = biz_id(item)
        box.schedule_receipt(item, send_receipt)
        return ok(item.provider_message_id)

    def send_batch(params: dict[str, str]) -> web.Response:
        """Per recipient a number, a signature and the template's variables; one BizId for the call."""
        for name in ("PhoneNumberJson", "SignNameJson", "TemplateCode"):
            if not params.get(name):
                return error(f"Missing{name}", f"{name} is mandatory for this action.", 400)
        try:
            numbers = json.loads(params["PhoneNumberJson"])
            signs = json.loads(params["SignNameJson"])
            variables = json.loads(params.get("TemplateParamJson") or "null") or [{}] * len(numbers)
            if not all(isinstance(x, list) for x in (numbers, signs, variables)):
                raise ValueError
            if not all(isinstance(v, dict) and all(isinstance(s, str) for s in v.values()) for v in variables):
                raise ValueError
        except ValueError:
            return error("isv.INVALID_JSON_PARAM", "JSON参数不合法，只接受字符串值")
        if not len(numbers) == len(signs) == len(variables):
            return error("isv.INVALID_PARAMETERS", "号码、签名与模板变量的个数不一致")
        if len(numbers) > BATCH_MOST:
            return error("isv.MOBILE_COUNT_OVER_LIMIT", f"手机号码个数超过上限{BATCH_MOST}")
        if not all(isinstance(n, str) and PHONE.match(n) for n in numbers):
            return error("isv.MOBILE_NUMBER_ILLEGAL", "非法手机号")
        if not TEMPLATE.match(params["TemplateCode"]):
            return error("isv.SMS_TEMPLATE_ILLEGAL", "该账号下找不到对应模板")
        items = []
        for number, sign, values in zip(numbers, signs, variables, strict=True):
            body = {
                "message_id": None,  # SendBatchSms has no per-recipient OutId
                "PhoneNumbers": number,
                "SignName": sign,
                "TemplateCode": params["TemplateCode"],
                "TemplateParam": values,
                "sms_size": segments(f"【{sign}】" + "".join(values.values())),
                "batch": True,
            }
            items.append(box.record(body, None))
        shared = biz_id(items[0])
        for item in items:
            item.provider_message_id = shared
        box.schedule_receipts(items, send_receipts)
        return ok(shared)

    def biz_id(item: Received) -> str:
        # BizIds look like "900619746936498440^0": digits, then the part index.
        return f"{9_006_197_469_364_000 + int(item.provider_message_id.rsplit('-', 1)[1])}^0"

    def ok(biz: str) -> web.Response:
        return web.json_response({"Message": "OK", "RequestId": str(uuid.uuid4()).upper(), "Code": "OK", "BizId": biz})

    return [web.post("/", rpc), web.get("/", rpc)]
