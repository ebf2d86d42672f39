##! Threat Bus bridge for Zeek's Intel framework, over Zeek's WebSocket API.
##!
##! Threat Bus (plugin ``threatbus-zeek``) connects as a WebSocket client and
##! publishes ``ThreatBus::add_intels`` (batches), ``ThreatBus::add_intel`` and
##! ``ThreatBus::remove_intel`` events on
##! :zeek:see:`ThreatBus::intel_topic`; this script turns them into
##! :zeek:see:`Intel::insert` / :zeek:see:`Intel::remove` calls. Every
##! :zeek:see:`Intel::match` of an item that came from Threat Bus (its
##! ``meta$source`` is a STIX indicator id) is published back as a
##! ``ThreatBus::intel_match`` event on :zeek:see:`ThreatBus::match_topic`,
##! which Threat Bus turns into a STIX 2.1 sighting.
##!
##! Zeek 5.0 and later. The WebSocket server is started with
##! ``Cluster::listen_websocket`` where Zeek has it (Zeek 8.0 and later) and
##! with ``Broker::listen_websocket`` otherwise (Zeek 5.x to 7.x). In a
##! cluster, only the manager listens and bridges: the Intel framework
##! distributes items to the workers and raises ``Intel::match`` on the
##! manager.
##!
##! The module name must equal ``module_namespace`` in the Threat Bus config
##! (default ``ThreatBus``); the two topics must equal the plugin's.

@load base/frameworks/intel
@load base/frameworks/cluster

module ThreatBus;

export {
	## Start a WebSocket server for Threat Bus. Set to F when the node
	## already runs one (e.g. zeekctl's ``UseWebSocket = 1`` on Zeek 8);
	## Threat Bus then connects to that server.
	const listen_websocket = T &redef;

	## Address the WebSocket server listens on.
	const listen_address: addr = 127.0.0.1 &redef;

	## Port of the WebSocket server (Threat Bus config key ``port``).
	const listen_port = 9997/tcp &redef;

	## TLS certificate and key of the WebSocket server (Zeek 8 and later;
	## empty: plain ``ws://``). With ``Broker::listen_websocket`` (Zeek 5.x
	## to 7.x) TLS follows Broker's own settings instead:
	## ``Broker::ssl_certificate``, ``Broker::ssl_keyfile``,
	## ``Broker::ssl_cafile``, or ``Broker::disable_ssl = T`` for ``ws://``.
	const tls_cert_file = "" &redef;
	const tls_key_file = "" &redef;

	## Topic on which Threat Bus publishes intel for Zeek.
	const intel_topic = "threatbus/zeek/intel" &redef;

	## Topic on which this script publishes intel matches for Threat Bus.
	const match_topic = "threatbus/zeek/sighting" &redef;

	## Intel items whose ``meta$source`` matches this pattern came from
	## Threat Bus; only their matches are reported back.
	const source_pattern = /^indicator--/ &redef;

	## Threat Bus -> Zeek: insert an intel item. ``source`` is the STIX
	## indicator id, ``desc`` its name (may be empty).
	global add_intel: event(indicator: string, indicator_type: Intel::Type, source: string,
	                        desc: string) &is_used;

	## One intel item of :zeek:see:`ThreatBus::add_intels`.
	type IntelItem: record {
		indicator: string;
		indicator_type: Intel::Type;
		source: string;
		desc: string;
	};

	## Threat Bus -> Zeek: insert many intel items at once (Threat Bus
	## sends additions in batches of up to ``batch_size``).
	global add_intels: event(items: vector of IntelItem) &is_used;

	## Threat Bus -> Zeek: remove the intel item that ``source`` added.
	global remove_intel: event(indicator: string, indicator_type: Intel::Type, source: string) &is_used;

	## Zeek -> Threat Bus: an intel item from Threat Bus matched.
	##
	## ts: when (network time, seconds since the epoch).
	## source: the STIX indicator id of the matched item.
	## indicator: the matched item's indicator (for SUBNET: the subnet).
	## indicator_type: the matched item's type.
	## context: ``where``, ``node``, ``seen`` (the value Zeek saw), ``uid``,
	##     ``orig_h``, ``orig_p``, ``resp_h``, ``resp_p``, ``fuid``, as present.
	global intel_match: event(ts: double, source: string, indicator: string,
	                          indicator_type: Intel::Type, context: table[string] of string);
}

function bridges(): bool
	{
	return ! Cluster::is_enabled() || Cluster::local_node_type() == Cluster::MANAGER;
	}

event zeek_init() &priority=-5
	{
	if ( ! bridges() )
		return;

@ifdef ( Cluster::subscribe )
	Cluster::subscribe(intel_topic);
@else
	Broker::subscribe(intel_topic);
@endif

	if ( ! listen_websocket )
		return;

@ifdef ( Cluster::listen_websocket )
	local options = Cluster::WebSocketServerOptions($listen_addr=listen_address, $listen_port=listen_port);
	if ( tls_cert_file != "" )
		options$tls_options = Cluster::WebSocketTLSOptions($cert_file=tls_cert_file, $key_file=tls_key_file);
	if ( ! Cluster::listen_websocket(options) )
		{
		Reporter::error(fmt("Threat Bus: cannot listen for WebSocket clients on %s:%s",
		                    listen_address, listen_port));
		return;
		}
@else
	Broker::listen_websocket(cat(listen_address), listen_port);
@endif

	Reporter::info(fmt("Threat Bus: listening for WebSocket clients on %s:%s, intel on topic %s",
	                   listen_address, listen_port, intel_topic));
	}

event ThreatBus::add_intel(indicator: string, indicator_type: Intel::Type, source: string, desc: string)
	{
	local meta = Intel::MetaData($source=source);
	if ( desc != "" )
		meta$desc = desc;

	Intel::insert(Intel::Item($indicator=indicator, $indicator_type=indicator_type, $meta=meta));
	}

event ThreatBus::add_intels(items: vector of IntelItem)
	{
	for ( i in items )
		{
		local item = items[i];
		local meta = Intel::MetaData($source=item$source);
		if ( item$desc != "" )
			meta$desc = item$desc;

		Intel::insert(Intel::Item($indicator=item$indicator, $indicator_type=item$indicator_type,
		                          $meta=meta));
		}
	}

event ThreatBus::remove_intel(indicator: string, indicator_type: Intel::Type, source: string)
	{
	# Removes this source's metadata; the indicator goes once no source is left.
	Intel::remove(Intel::Item($indicator=indicator, $indicator_type=indicator_type,
	                          $meta=Intel::MetaData($source=source)));
	}

event Intel::match(s: Intel::Seen, items: set[Intel::Item])
	{
	local context: table[string] of string = table();
	context["where"] = cat(s$where);

	if ( s?$node )
		context["node"] = s$node;

	if ( s?$indicator )
		context["seen"] = s$indicator;

	if ( s?$conn )
		{
		context["uid"] = s$conn$uid;
		context["orig_h"] = cat(s$conn$id$orig_h);
		context["orig_p"] = cat(s$conn$id$orig_p);
		context["resp_h"] = cat(s$conn$id$resp_h);
		context["resp_p"] = cat(s$conn$id$resp_p);
		}
	else if ( s?$uid )
		context["uid"] = s$uid;

	if ( s?$fuid )
		context["fuid"] = s$fuid;

	local ts = time_to_double(network_time());
	if ( ts == 0.0 )
		ts = time_to_double(current_time());

	for ( item in items )
		{
		if ( source_pattern !in item$meta$source )
			next;

@ifdef ( Cluster::publish )
		Cluster::publish(match_topic, intel_match, ts, item$meta$source, item$indicator,
		                 item$indicator_type, context);
@else
		Broker::publish(match_topic, intel_match, ts, item$meta$source, item$indicator,
		                item$indicator_type, context);
@endif
		}
	}
