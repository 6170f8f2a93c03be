// A vmgrid client written with node-soap (npm `soap`), as a JavaScript developer would: clients built from the
// WSDL a live grid serves, requests signed by node-soap's WSSecurityCert, every answer verified with xml-crypto
// (the library node-soap signs with) against the grid CA. Prints one JSON line per step; exits 1 on a failure.
//
//   node vmgrid_client.js CONFIG.json
// CONFIG: {repoWsdl, vmmWsdl, cert, key, caFile, hostCN, deployXml, unknownImage, repoUrl, vmmUrl, actions,
//          pkiPath (optional: base64 DER of an X509PKIPathv1, the proxy chain), steps (the steps to run, default all)}
// or, for the job service: {jobsWsdl, jobsUrl, cert, key, caFile, hostCN, actions, pkiPath, echo, long, unknownKey}
// (the steps of tests/interop/job_service.py's JOB_STEPS: a job run, its properties, Cancel, Destroy, typed faults)
'use strict';
const fs = require('fs');
const crypto = require('crypto');
const soap = require('soap');
const { SignedXml } = require('xml-crypto');
const { DOMParser } = require('@xmldom/xmldom');

const SOAP_NS = 'http://schemas.xmlsoap.org/soap/envelope/';
const DS = 'http://www.w3.org/2000/09/xmldsig#';
const WSSE = 'http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd';
const WSU = 'http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd';
const X509V3 = 'http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-x509-token-profile-1.0#X509v3';
const PKIPATH = 'http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-x509-token-profile-1.0#X509PKIPathv1';
const VMM = 'http://vmgrid.org/ns/vmmanager/1';
const RP = 'http://docs.oasis-open.org/wsrf/rp-2';
const JOB = 'http://vmgrid.org/ns/jobs/1';

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const key = fs.readFileSync(config.key, 'utf8');
const cert = fs.readFileSync(config.cert, 'utf8');
const ca = new crypto.X509Certificate(fs.readFileSync(config.caFile));

// The settings vmgrid accepts (docs/security.md): RSA-SHA256, SHA-256 digests, wsu:Id, exclusive c14n
// (node-soap puts enveloped-signature before it on the Timestamp, which vmgrid accepts as a no-op).
function security(additionalReferences = [], chain = true) {
  const sec = new soap.WSSecurityCert(key, cert, '', {
    hasTimeStamp: true,
    signatureAlgorithm: 'http://www.w3.org/2001/04/xmldsig-more#rsa-sha256',
    digestAlgorithm: 'http://www.w3.org/2001/04/xmlenc#sha256',
    signerOptions: { idMode: 'wssecurity' },
    additionalReferences,
  });
  if (config.pkiPath && chain) {
    // WSSecurityCert writes one certificate, always as X509v3 (ValueType fixed in postProcess and in the KeyInfo);
    // a proxy needs its chain: the token's content becomes the X509PKIPathv1 and both ValueTypes say so (neither
    // the token nor the KeyInfo is inside SignedInfo, so the signature is unchanged)
    sec.publicP12PEM = config.pkiPath;
    const postProcess = sec.postProcess.bind(sec);
    sec.postProcess = (xml, envelopeKey) => postProcess(xml, envelopeKey).split(`${X509V3}"`).join(`${PKIPATH}"`);
  }
  return sec;
}

// Verify a signed answer: the host certificate in the BinarySecurityToken is issued by the grid CA, is the
// host called, the signature verifies, and its references cover this very Body and the Timestamp.
function verifyAnswer(xml) {
  const doc = new DOMParser().parseFromString(xml, 'text/xml');
  const signature = doc.getElementsByTagNameNS(DS, 'Signature')[0];
  if (!signature) throw new Error('the answer is not signed');
  const bst = doc.getElementsByTagNameNS(WSSE, 'BinarySecurityToken')[0];  // vmgrid answers with X509v3
  if (!bst || bst.getAttribute('ValueType') !== X509V3) throw new Error('no X509v3 BinarySecurityToken');
  const host = new crypto.X509Certificate(Buffer.from(bst.textContent.replace(/\s+/g, ''), 'base64'));
  if (!host.checkIssued(ca) || !host.verify(ca.publicKey)) throw new Error('the signer is not issued by the grid CA');
  if (!host.subject.split('\n').includes(`CN=${config.hostCN}`)) throw new Error(`signed by ${host.subject}`);
  const now = new Date();
  if (now < new Date(host.validFrom) || now > new Date(host.validTo)) throw new Error('host certificate expired');
  const sig = new SignedXml({ publicCert: host.toString(), idMode: 'wssecurity' });
  sig.loadSignature(signature);
  if (!sig.checkSignature(xml)) throw new Error('the signature does not verify');
  const uris = sig.getReferences().map((r) => r.uri);
  const body = doc.getElementsByTagNameNS(SOAP_NS, 'Body')[0];
  const ts = doc.getElementsByTagNameNS(WSU, 'Timestamp')[0];
  for (const el of [body, ts]) {
    const id = el && el.getAttributeNS(WSU, 'Id');
    if (!id || !uris.includes(`#${id}`)) throw new Error(`${el ? el.localName : 'Timestamp'} is not signed`);
  }
  return true;
}

// WS-Addressing: every request carries a signed wsa:To (the service's address) and wsa:Action (the
// operation's soapAction): vmgrid refuses a request signed for another endpoint or operation. And a signed
// wsa:MessageID of its own: node-soap's Timestamp has whole seconds and its Ids are fixed, so without it the same
// request sent twice in one second is byte-identical where signed, and vmgrid refuses the second as a replay.
const WSA = 'http://www.w3.org/2005/08/addressing';
function addressed(client, url, op, extraHeaders = [], extraRefs = [], chain = true) {
  client.clearSoapHeaders();
  client.addSoapHeader(`<wsa:To xmlns:wsa="${WSA}">${url}</wsa:To>`);
  client.addSoapHeader(`<wsa:Action xmlns:wsa="${WSA}">${config.actions[op]}</wsa:Action>`);
  client.addSoapHeader(`<wsa:MessageID xmlns:wsa="${WSA}">urn:uuid:${crypto.randomUUID()}</wsa:MessageID>`);
  for (const h of extraHeaders) client.addSoapHeader(h);
  client.setSecurity(security(['wsa:To', 'wsa:Action', 'wsa:MessageID', ...extraRefs], chain));
  return client;
}

function lastAnswer(client) {
  return client.lastResponse;
}

async function step(name, fn) {
  if (config.steps && !config.steps.includes(name)) return undefined;
  try {
    const detail = await fn();
    console.log(JSON.stringify({ step: name, ok: true, detail }));
    return detail;
  } catch (err) {
    const body = err && err.body ? String(err.body).slice(0, 2000) : undefined;
    const fault = err && err.root && err.root.Envelope && err.root.Envelope.Body && err.root.Envelope.Body.Fault;
    console.log(JSON.stringify({ step: name, ok: false, error: String(err && err.message || err), body,
                                 faultstring: fault ? fault.faultstring : undefined }));
    process.exitCode = 1;
    throw err;
  }
}

async function main() {
  const repo = await soap.createClientAsync(config.repoWsdl);
  const vmm = await soap.createClientAsync(config.vmmWsdl);
  // with a proxy: first WSSecurityCert as it is, the proxy certificate alone as X509v3, which vmgrid refuses
  await step('ProxyAlone', async () => {
    try {
      await addressed(repo, config.repoUrl, 'ListVOs', [], [], false).ListVOsAsync({});
    } catch (err) {
      const fault = err.root && err.root.Envelope && err.root.Envelope.Body && err.root.Envelope.Body.Fault;
      if (!fault) throw err;
      return fault.faultstring;
    }
    throw new Error('the proxy alone was accepted');
  });
  await step('ListVOs', async () => {
    const [result, raw] = await addressed(repo, config.repoUrl, 'ListVOs').ListVOsAsync({});
    verifyAnswer(raw);
    return result;
  });
  // the same request again at once (in the same second, as a poll would): a new message, not a replay
  await step('ListVOsAgain', async () => {
    const [result, raw] = await addressed(repo, config.repoUrl, 'ListVOs').ListVOsAsync({});
    verifyAnswer(raw);
    return result;
  });

  await step('QueryImages', async () => {
    const [result, raw] = await addressed(repo, config.repoUrl, 'QueryImages').QueryImagesAsync({
      criteria: { group: [{ criterion: [
        { field: 'memory', operator: 'ge', value: '64' },
        { field: 'distribution', operator: 'eq', value: 'debian' },
      ] }] },
    });
    verifyAnswer(raw);
    return { count: raw.split('<ws:workspace').length - 1, result: Object.keys(result || {}) };
  });

  await step('UnknownImageFault', async () => {
    try {
      await addressed(repo, config.repoUrl, 'GetDescriptor').GetDescriptorAsync({ image: config.unknownImage });
    } catch (err) {
      const raw = err.body;
      verifyAnswer(raw);
      const fault = err.root.Envelope.Body.Fault;
      const detail = Object.keys(fault.detail || {});
      if (!detail.includes('UnknownImageFault')) throw new Error(`detail ${detail}`);
      return { faultcode: fault.faultcode, detail };
    }
    throw new Error('GetDescriptor of an unknown image answered without a fault');
  });

  const key_ = await step('Deploy', async () => {
    const [, raw] = await addressed(vmm, config.vmmUrl, 'Deploy').DeployAsync({ _xml: config.deployXml });
    verifyAnswer(raw);
    const m = raw.match(/<vmm:InstanceKey[^>]*>([^<]+)<\/vmm:InstanceKey>/);
    if (!m) throw new Error('no InstanceKey in the answer');
    return m[1];
  });

  // Instance operations carry the InstanceKey header, which must be signed too.
  const instance = (op) => addressed(vmm, config.vmmUrl, op,
    [`<vmm:InstanceKey xmlns:vmm="${VMM}">${key_}</vmm:InstanceKey>`], ['vmm:InstanceKey']);
  const state = async (op) => {
    const [, raw] = await instance(op)[`${op}Async`]({});
    verifyAnswer(raw);
    return (raw.match(/<vmm:State>([^<]+)<\/vmm:State>/) || [])[1];
  };

  await step('GetResourceProperty', async () => {
    // QName content: its prefix must be declared inside the signed Body. node-soap declares every prefix of the
    // WSDL (vmm too) on the Envelope and drops the same declaration inside the Body when it signs, so the
    // property name uses a prefix of its own.
    const [, raw] = await instance('GetResourceProperty').GetResourcePropertyAsync({
      _xml: `<wsrf-rp:GetResourceProperty xmlns:wsrf-rp="${RP}" xmlns:p="${VMM}">p:State</wsrf-rp:GetResourceProperty>`,
    });
    verifyAnswer(raw);
    return (raw.match(/<vmm:State>([^<]+)<\/vmm:State>/) || [])[1];
  });
  await step('Pause', () => state('Pause'));
  await step('Resume', () => state('Resume'));
  await step('Destroy', async () => {
    const [, raw] = await instance('Destroy').DestroyAsync({});
    verifyAnswer(raw);
    return raw.includes('DestroyResponse');
  });
}

// The job service: a job's operations carry its JobKey (the reference parameter of the EndpointReference SubmitJob
// answers) as a SOAP header, signed like InstanceKey.
function faultDetail(err) {
  const fault = err && err.root && err.root.Envelope && err.root.Envelope.Body && err.root.Envelope.Body.Fault;
  if (!fault) throw err;
  verifyAnswer(err.body);
  return Object.keys(fault.detail || {});
}

async function jobs() {
  const client = await soap.createClientAsync(config.jobsWsdl);
  const job = (op, jobKey) => addressed(client, config.jobsUrl, op,
    [`<job:JobKey xmlns:job="${JOB}">${jobKey}</job:JobKey>`], ['job:JobKey']);
  const submit = async (command) => {
    const [result, raw] = await addressed(client, config.jobsUrl, 'SubmitJob').SubmitJobAsync(
      { executable: command[0], argument: command.slice(1), lifetime: 600 });
    verifyAnswer(raw);
    const m = raw.match(/<job:JobKey[^>]*>([^<]+)<\/job:JobKey>/);
    if (!m || !result.Job || !result.Job.State) throw new Error('no JobKey or State in the answer');
    return m[1];
  };
  // one resource property, as the elements of the answer (QName content: a prefix of its own, as for vmm:State)
  const property = async (jobKey, name) => {
    const [, raw] = await job('GetResourceProperty', jobKey).GetResourcePropertyAsync({
      _xml: `<wsrf-rp:GetResourceProperty xmlns:wsrf-rp="${RP}" xmlns:p="${JOB}">p:${name}</wsrf-rp:GetResourceProperty>`,
    });
    verifyAnswer(raw);
    const doc = new DOMParser().parseFromString(raw, 'text/xml');
    return Array.from(doc.getElementsByTagNameNS(JOB, name));
  };
  const state = async (jobKey) => (await property(jobKey, 'State'))[0].textContent;
  const until = async (jobKey, wanted) => {
    for (let i = 0; i < 600; i++) {
      const s = await state(jobKey);
      if (s === wanted) return s;
      if (['Done', 'Failed', 'Cancelled'].includes(s)) return s;
      await new Promise((r) => setTimeout(r, 100));
    }
    return state(jobKey);
  };
  const echo = await step('SubmitJob', () => submit(config.echo));
  await step('State', () => until(echo, 'Done'));
  await step('ListJobs', async () => {
    const [result, raw] = await addressed(client, config.jobsUrl, 'ListJobs').ListJobsAsync({ includeEnded: true });
    verifyAnswer(raw);
    const listed = [].concat((result && result.Job) || []);
    const doc = new DOMParser().parseFromString(raw, 'text/xml');
    for (const job of Array.from(doc.getElementsByTagNameNS(JOB, 'Job'))) {
      if (job.getElementsByTagNameNS(JOB, 'JobKey')[0].textContent === echo) {
        const text = (n) => job.getElementsByTagNameNS(JOB, n)[0].textContent;
        return `${text('State')} ${text('ExitCode')}`;
      }
    }
    throw new Error(`${echo} is not among the ${listed.length} jobs listed`);
  });
  await step('Outputs', async () => {
    const [outputs] = await property(echo, 'Outputs');
    return Array.from(outputs.getElementsByTagNameNS(JOB, 'file')).map((f) => ['name', 'size', 'sha256'].map(
      (n) => f.getElementsByTagNameNS(JOB, n)[0].textContent).join(' ')).join(';');
  });
  await step('CancelRequestedAfterEnd', async () => {
    const found = await property(echo, 'CancelRequested');
    return found.length ? found[0].textContent : 'absent';
  });
  await step('ResourceBounds', async () => {
    const found = await property(echo, 'ResourceBounds');
    return found.length ? `${found[0].getElementsByTagNameNS(JOB, 'event').length} events` : 'absent';
  });
  const long = await step('SubmitLongJob', () => submit(config.long));
  await until(long, 'Active');
  await step('Cancel', async () => {
    const [result, raw] = await job('Cancel', long).CancelAsync({});
    verifyAnswer(raw);
    return result.State;
  });
  await step('CancelRequested', async () => {
    const found = await property(long, 'CancelRequested');
    return found.length ? found[0].textContent : 'absent';
  });
  await step('Cancelled', () => until(long, 'Cancelled'));
  await step('IllegalTransitionFault', async () => {
    try {
      await job('Cancel', long).CancelAsync({});
    } catch (err) {
      return faultDetail(err).join(',');
    }
    throw new Error('Cancel of a Cancelled job answered without a fault');
  });
  for (const [name, jobKey] of [['Destroy', echo], ['DestroyLong', long]]) {
    await step(name, async () => {
      const [, raw] = await job('Destroy', jobKey).DestroyAsync({});
      verifyAnswer(raw);
      return raw.includes('DestroyResponse') ? 'destroyed' : raw;
    });
  }
  await step('ResourceUnknownFault', async () => {
    try {
      await property(config.unknownKey, 'State');
    } catch (err) {
      return faultDetail(err).join(',');
    }
    throw new Error('a property of an unknown job answered without a fault');
  });
  await step('InvalidArgumentFault', async () => {
    try {
      await submit(['']);                  // the schema's executable is a non-empty string
    } catch (err) {
      return faultDetail(err).join(',');
    }
    throw new Error('a SubmitJob the schema refuses answered without a fault');
  });
}

(config.jobsWsdl ? jobs() : main()).catch(() => { process.exitCode = 1; });
