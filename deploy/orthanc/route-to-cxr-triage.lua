-- Auto-routing for the cxr-triage demo PACS: every chest radiograph Orthanc receives is sent
-- on to the triage service (modality "cxr-triage" in orthanc.json), one instance at a time;
-- the service groups them into studies. The service's own results (SR and SC, sent by the
-- AE CXR_TRIAGE) and other modalities stay here, so nothing loops.

TRIAGE_MODALITY = 'cxr-triage'
TRIAGE_AET = 'CXR_TRIAGE'

function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin['RemoteAet'] == TRIAGE_AET then
    return
  end
  local modality = tags['Modality']
  if modality == 'CR' or modality == 'DX' then
    -- A job: a triage service that is down delays the send, never the store here.
    SendToModality(instanceId, TRIAGE_MODALITY)
  end
end
